//! `senet models`: every model the registry knows, with its size and cost.

use crate::nn::{models, Network};
use std::process::ExitCode;

/// Options of `senet models`.
#[derive(clap::Args)]
pub struct Args {
    /// Only these models (default: all).
    names: Vec<String>,
}

pub fn run(args: Args) -> crate::Result<ExitCode> {
    let names: Vec<String> = if args.names.is_empty() {
        models::MODELS.iter().map(|m| m.name.to_string()).collect()
    } else {
        args.names
    };
    println!(
        "{:<20} {:>13} {:>8}  {:<11} description",
        "model", "parameters", "GFLOPs", "input"
    );
    for name in &names {
        // Building a network allocates no parameter values, so this is cheap for every model.
        let net: Network<f32> = models::build(name)?;
        let (c, h, w) = net.input_size();
        let description = models::MODELS
            .iter()
            .find(|m| m.name == name)
            .map_or("", |m| m.description);
        println!(
            "{:<20} {:>13} {:>8.2}  {:<11} {description}",
            name,
            group_digits(net.num_params()),
            net.macs()? as f64 / 1e9,
            format!("{c}x{h}x{w}"),
        );
    }
    println!("GFLOPs count multiply-adds of one image at the input size, as the SE paper does.");
    Ok(ExitCode::SUCCESS)
}

fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
