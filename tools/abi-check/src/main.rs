//! Generates the Rust side of `kernels/abi.h` with bindgen and compares it with the checked-in
//! `src/cuda/abi_generated.rs` (exit status 1 when stale); `--write` replaces the checked-in file.
//! Needs libclang (Debian: libclang1-14).

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let header = root.join("kernels/abi.h");
    let checked_in = root.join("src/cuda/abi_generated.rs");
    let write = std::env::args().any(|a| a == "--write");
    let bindings = match bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_type("Se.*")
        .allowlist_type("Nn.*")
        .allowlist_var("SENET_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .formatter(bindgen::Formatter::Prettyplease)
        .generate()
    {
        Ok(b) => b.to_string(),
        Err(e) => {
            eprintln!("bindgen failed on {}: {e}", header.display());
            return ExitCode::FAILURE;
        }
    };
    if write {
        if let Err(e) = std::fs::write(&checked_in, &bindings) {
            eprintln!("writing {}: {e}", checked_in.display());
            return ExitCode::FAILURE;
        }
        println!("updated {}", checked_in.display());
        return ExitCode::SUCCESS;
    }
    match std::fs::read_to_string(&checked_in) {
        Ok(old) if old == bindings => {
            println!("src/cuda/abi_generated.rs matches kernels/abi.h");
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!("src/cuda/abi_generated.rs is stale: run scripts/regen-abi.sh");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("reading {}: {e}", checked_in.display());
            ExitCode::FAILURE
        }
    }
}
