//! The paper's ablations (Hu et al., section 6): SE against no SE, the reduction ratio `r`,
//! SE in one stage at a time, and where SE sits in the residual unit (standard, PRE, POST,
//! Identity). [`paper_variants`] lists them for a ResNet-family model; [`markdown`] writes the
//! results table.

use crate::nn::{SeBlockConfig, SePosition};
use crate::train::trainer::position_name;

/// One network of an ablation.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// The ablation it belongs to: `se`, `ratio`, `stage` or `integration`.
    pub group: &'static str,
    /// A short name for tables and plots.
    pub name: String,
    /// SE per stage (`None`: none in that stage).
    pub se: Vec<Option<SeBlockConfig>>,
}

/// The ratios the paper tries (table 10).
pub const RATIOS: [usize; 5] = [2, 4, 8, 16, 32];

/// The integration variants the paper compares (table 14).
pub const POSITIONS: [SePosition; 4] = [
    SePosition::Standard,
    SePosition::Pre,
    SePosition::Post,
    SePosition::Identity,
];

/// Every variant of the four ablations for a model of `stages` stages, `base` being the SE of
/// the reference SE network (its ratio and position). Variants that coincide (the reference
/// appears in every ablation) are listed in each group; run each distinct one once.
pub fn paper_variants(stages: usize, base: SeBlockConfig) -> Vec<Variant> {
    let all = |o: SeBlockConfig| vec![Some(o); stages];
    let mut v = vec![
        Variant {
            group: "se",
            name: "no SE".into(),
            se: vec![None; stages],
        },
        Variant {
            group: "se",
            name: describe(&all(base)),
            se: all(base),
        },
    ];
    for r in RATIOS {
        let o = SeBlockConfig {
            reduction: r,
            ..base
        };
        v.push(Variant {
            group: "ratio",
            name: format!("r = {r}"),
            se: all(o),
        });
    }
    for s in 0..stages {
        let mut se = vec![None; stages];
        se[s] = Some(base);
        v.push(Variant {
            group: "stage",
            name: format!("SE in stage {} only", s + 1),
            se,
        });
    }
    v.push(Variant {
        group: "stage",
        name: "SE in all stages".into(),
        se: all(base),
    });
    for p in POSITIONS {
        let o = SeBlockConfig {
            position: p,
            ..base
        };
        v.push(Variant {
            group: "integration",
            name: position_name(p).to_string(),
            se: all(o),
        });
    }
    v
}

/// A one-line description of SE per stage: `SE r=4 standard` when every stage has the same,
/// else per stage (`-` for none).
pub fn describe(se: &[Option<SeBlockConfig>]) -> String {
    let one = |o: &Option<SeBlockConfig>| match o {
        None => "-".to_string(),
        Some(o) => format!("r={} {}", o.reduction, position_name(o.position)),
    };
    if se.iter().all(|s| s.is_none()) {
        "no SE".into()
    } else if se.windows(2).all(|w| w[0] == w[1]) {
        format!("SE {}", one(&se[0]))
    } else {
        se.iter().map(one).collect::<Vec<_>>().join(" / ")
    }
}

/// One measured variant.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The variant.
    pub variant: Variant,
    /// Trainable parameters.
    pub params: usize,
    /// Test top-1 accuracy (fraction).
    pub top1: f64,
    /// Test top-5 accuracy (fraction).
    pub top5: f64,
    /// Training seconds (all epochs, evaluation excluded).
    pub train_seconds: f64,
}

/// The results as markdown: one table per ablation, in the order of the rows' groups.
pub fn markdown(rows: &[Row]) -> String {
    let mut groups: Vec<&str> = Vec::new();
    for r in rows {
        if !groups.contains(&r.variant.group) {
            groups.push(r.variant.group);
        }
    }
    let title = |g: &str| match g {
        "se" => "SE against no SE",
        "ratio" => "Reduction ratio r (table 10)",
        "stage" => "SE per stage (table 13)",
        "integration" => "SE integration (table 14)",
        _ => "Other",
    };
    let mut s = String::new();
    for g in groups {
        s.push_str(&format!("### {}\n\n", title(g)));
        s.push_str("| variant | params | top-1 acc (%) | top-1 err (%) | top-5 acc (%) | train time (s) |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|\n");
        for r in rows.iter().filter(|r| r.variant.group == g) {
            s.push_str(&format!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.1} |\n",
                r.variant.name,
                r.params,
                100.0 * r.top1,
                100.0 * (1.0 - r.top1),
                100.0 * r.top5,
                r.train_seconds
            ));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_cover_the_paper() {
        let base = SeBlockConfig {
            reduction: 4,
            divisor: 1,
            ..SeBlockConfig::default()
        };
        let v = paper_variants(3, base);
        assert_eq!(v.len(), 2 + 5 + 4 + 4);
        assert!(v[0].se.iter().all(Option::is_none));
        let stage2: Vec<_> = v
            .iter()
            .filter(|x| x.name == "SE in stage 2 only")
            .collect();
        assert_eq!(stage2[0].se, vec![None, Some(base), None]);
        let post = v.iter().find(|x| x.name == "post").unwrap();
        assert!(post
            .se
            .iter()
            .all(|s| s.unwrap().position == SePosition::Post));
        assert_eq!(describe(&v[1].se), "SE r=4 standard");
        let table = markdown(&[Row {
            variant: v[0].clone(),
            params: 10,
            top1: 0.5,
            top5: 0.9,
            train_seconds: 1.0,
        }]);
        assert!(table.contains("| no SE | 10 | 50.00 | 50.00 | 90.00 | 1.0 |"));
    }
}
