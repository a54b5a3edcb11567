//! senet as a lean dependency: the SE op on the CPU (slices) and on the kernel emulator
//! (borrowed views and a caller workspace), against the f64 reference; and a clear error, not a
//! panic, where there is no GPU. Exits non-zero on any failure.

use half::bf16;
use senet::cuda::testing::Poison;
use senet::cuda::{CudaDevice, DeviceTensor, DeviceViewMut};
use senet::se::cpu::{self, CpuSaved, SeForwardSlices};
use senet::se::cuda::{self as secuda, DeviceSeSaved, DeviceSeWeights, Direction, SeForwardViews};
use senet::se::reference;
use senet::{rel_l2_error, DType, Init, Layout, SeConfig, SeWeights, Shape, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = SeConfig::with_reduction(48, 16)?;
    let w = SeWeights::init(cfg, Init::PyTorchDefault, 1)?;
    let shape = Shape::try_new(3, 48, 7, 5)?;
    let mut failures = 0;
    for layout in Layout::ALL {
        let x = Tensor::<bf16>::random(shape, layout, 2)?;
        let want = reference::forward(&w, &x, None)?.y;

        // The fast CPU path on plain slices.
        let mut y = vec![bf16::ZERO; shape.numel()];
        let mut saved = CpuSaved::new(&cfg, shape.n);
        cpu::forward_slices(
            shape,
            layout,
            SeForwardSlices {
                x: x.data(),
                residual: None,
                y: &mut y,
                weights: w.view(),
                saved: saved.view_mut(),
            },
        )?;
        let got: Vec<f64> = y.iter().map(|v| v.to_f64()).collect();
        let e = rel_l2_error(&got, &want);
        println!("cpu slices {layout}: relative error {e:.2e}");
        if e > DType::BF16.output_tolerance() {
            failures += 1;
        }

        // The kernels on the emulator, through views and a caller workspace.
        let dev = CudaDevice::emulator()?;
        let dw = DeviceSeWeights::upload(&dev, &w)?;
        let xd = DeviceTensor::from_host(&dev, &x)?;
        let mut yd = DeviceTensor::<bf16>::zeros(&dev, shape, layout)?;
        yd.poison(&dev)?;
        let mut sv = DeviceSeSaved::new(&dev, cfg, shape.n)?;
        let opts = Default::default();
        let bytes = secuda::workspace_bytes(
            &dev,
            &cfg,
            shape,
            layout,
            DType::BF16,
            Direction::Forward,
            opts,
        )?;
        let ws = DeviceTensor::<f32>::zeros(
            &dev,
            Shape::try_new(1, 1, 1, bytes / 4 + 1)?,
            Layout::Nchw,
        )?;
        // SAFETY: the tensor's own bytes, used by this call only.
        let wsv = unsafe { DeviceViewMut::<u8>::from_raw(&dev, ws.view(&dev).addr(), bytes) };
        let args = SeForwardViews {
            x: xd.view(&dev),
            residual: None,
            y: yd.view_mut(&dev),
            weights: dw.views(&dev),
            saved: sv.views_mut(&dev),
        };
        let path = secuda::forward_views(&dev, &cfg, shape, layout, args, wsv, opts)?;
        let got = yd.to_host(&dev)?.to_f64_vec();
        let e = rel_l2_error(&got, &want);
        println!("emulated kernels ({path}) {layout}: relative error {e:.2e}");
        if e > DType::BF16.output_tolerance() {
            failures += 1;
        }
    }

    // No GPU here (stub CUDA libraries): an error, never a panic.
    match CudaDevice::new(0) {
        Ok(d) => println!("a GPU is present: {}", d.info().name),
        Err(e) if e.is_no_gpu() => println!("no GPU, as expected here: {e}"),
        Err(e) => {
            println!("unexpected error opening device 0: {e}");
            failures += 1;
        }
    }
    if failures > 0 {
        return Err(format!("{failures} checks failed").into());
    }
    println!("downstream: all checks passed");
    Ok(())
}
