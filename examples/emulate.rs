//! Runs SE forward on the CPU emulator of the kernels for one shape, on the three-kernel and
//! cluster paths, and prints z and y errors against the reference (a development aid for
//! kernel work without a GPU).
//!
//!     cargo run --release --example emulate -- N C H W OFFSET
use senet::cuda::testing;
use senet::cuda::CudaDevice;
use senet::se::check;
use senet::se::cuda::{self as secuda, DeviceSeWeights, SeOptions, SePath};
use senet::*;

fn main() -> Result<()> {
    let dev = CudaDevice::emulator()?;
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let shape = Shape::new(args[0], args[1], args[2], args[3]);
    let off = args[4];
    for layout in Layout::ALL {
        let cfg = SeConfig::with_reduction(shape.c, 16)?;
        let w = SeWeights::init(cfg, Init::PyTorchDefault, 1)?;
        let x = check::input::<f32>(shape, layout, 2)?;
        let rf = senet::se::reference::forward(&w, &x, None)?;
        let dw = DeviceSeWeights::upload(&dev, &w)?;
        let xd = testing::from_host_at_offset(&dev, &x, off)?;
        for path in [SePath::ThreeKernel, SePath::Cluster] {
            let out = secuda::forward(&dev, &dw, &xd, None, SeOptions::with_path(path))?;
            let sv = out.saved.download(&dev)?;
            let y = out.y.to_host(&dev)?;
            let z = check::widen(&sv.z);
            let bad: Vec<usize> = (0..z.len())
                .filter(|&i| (z[i] - rf.saved.z[i]).abs() > 1e-5)
                .collect();
            if !bad.is_empty() {
                println!("  z got {:?}\n  z want {:?}", &z[..4], &rf.saved.z[..4]);
            }
            println!(
                "{layout} {path}: z {:.2e} y {:.2e} bad z at {:?}",
                rel_l2_error(&z, &rf.saved.z),
                rel_l2_error(&y.to_f64_vec(), &rf.y),
                &bad[..bad.len().min(12)]
            );
        }
    }
    Ok(())
}
