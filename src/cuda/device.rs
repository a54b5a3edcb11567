//! A handle on one CUDA device: its context, one stream, cached kernel modules and scratch.

use super::Module;
use crate::error::{Error, Result};
use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the crate needs to know about a device to pick kernels and launch shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// L2 cache size in bytes.
    pub l2_bytes: usize,
    /// The most dynamic shared memory a block may opt in to, in bytes.
    pub max_smem_per_block: usize,
    /// Global memory in bytes.
    pub total_memory: usize,
    /// Driver version as reported by the driver (e.g. 13000 for CUDA 13.0).
    pub driver_version: i32,
}

/// Scratch buffers reused between calls: split-reduction partials and the integer tickets that
/// pick the block that combines them (zeroed once, reset by the kernels after each use).
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) ws: Option<CudaSlice<f32>>,
    pub(crate) tickets: Option<CudaSlice<u32>>,
}

/// A CUDA device handle. Cheap to share (`Arc`); every operation runs on its one stream, in
/// order, and the host waits only where it needs data back.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<[Option<Arc<CudaModule>>; Module::COUNT]>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    scratch: Mutex<Scratch>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.info)
            .finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Errors (never panics) with [`Error::NoDriver`] when libcuda cannot
    /// be loaded, [`Error::NoDevice`] when there is no such device, and
    /// [`Error::UnsupportedDevice`] below compute capability 8.0.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: only probes whether the driver library can be loaded; without this check
        // cudarc's dynamic loading panics on a machine without libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDriver("libcuda could not be loaded".into()));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoDriver(format!("cuInit / cuDeviceGetCount failed: {e}")))?;
        if count <= 0 {
            return Err(Error::NoDevice("the driver reports 0 devices".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::driver("creating a context"))?;
        let attr = |a: Attr| {
            ctx.attribute(a)
                .map_err(Error::driver("reading device attributes"))
        };
        let cc = (
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        );
        let info = DeviceInfo {
            ordinal,
            name: ctx
                .name()
                .map_err(Error::driver("reading the device name"))?,
            compute_capability: cc,
            sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
            max_smem_per_block: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as usize,
            total_memory: {
                let mut bytes = 0usize;
                // SAFETY: ctx is bound to this thread by CudaContext::new; writes one usize.
                unsafe {
                    cudarc::driver::sys::cuDeviceTotalMem_v2(&mut bytes, ctx.cu_device())
                        .result()
                        .map_err(Error::driver("reading total memory"))?
                };
                bytes
            },
            driver_version: {
                let mut v = 0i32;
                // SAFETY: writes one int.
                unsafe {
                    cudarc::driver::sys::cuDriverGetVersion(&mut v)
                        .result()
                        .map_err(Error::driver("reading the driver version"))?
                };
                v
            },
        };
        if cc.0 < 8 {
            return Err(Error::UnsupportedDevice(format!(
                "{} has compute capability {}.{}; senet's kernels need 8.0 or newer",
                info.name, cc.0, cc.1
            )));
        }
        let stream = ctx
            .new_stream()
            .map_err(Error::driver("creating a stream"))?;
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            info,
            modules: Mutex::new(Default::default()),
            functions: Mutex::new(HashMap::new()),
            scratch: Mutex::new(Scratch::default()),
        }))
    }

    /// The device's properties.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The stream every operation of this handle runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Blocks until all work queued on this handle's stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(Error::driver("synchronizing the stream"))
    }

    /// True for Hopper (sm_90) and newer, where the cluster kernels run.
    pub fn has_clusters(&self) -> bool {
        self.info.compute_capability.0 >= 9 && !Module::Fused.fatbin().is_empty()
    }

    /// A kernel by name, loading (once) the module that holds it.
    pub(crate) fn function(&self, module: Module, name: &str) -> Result<CudaFunction> {
        let mut fns = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = fns.get(name) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m
            .load_function(name)
            .map_err(Error::driver(format!("loading kernel {name}")))?;
        fns.insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn module(&self, module: Module) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = &mods[module.index()] {
            return Ok(m.clone());
        }
        let bytes = module.fatbin();
        if bytes.is_empty() {
            if !super::kernels_built() {
                return Err(Error::KernelsNotBuilt);
            }
            return Err(Error::Unsupported(format!(
                "kernel module `{}` was not built for any arch this build targets ({:?})",
                module.name(),
                super::kernels::ARCHS
            )));
        }
        let m = self
            .ctx
            .load_module(Ptx::from_binary(bytes.to_vec()))
            .map_err(Error::driver(format!(
                "loading kernel module {}",
                module.name()
            )))?;
        mods[module.index()] = Some(m.clone());
        Ok(m)
    }

    /// Locks the scratch buffers, growing them to at least `ws_floats` partials and `tickets`
    /// tickets (new tickets are zeroed).
    pub(crate) fn scratch(
        &self,
        ws_floats: usize,
        tickets: usize,
    ) -> Result<MutexGuard<'_, Scratch>> {
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ws_floats = ws_floats.max(1);
        let tickets = tickets.max(1);
        if s.ws.as_ref().is_none_or(|b| b.len() < ws_floats) {
            s.ws = Some(
                self.stream
                    .alloc_zeros::<f32>(ws_floats.next_power_of_two())
                    .map_err(Error::driver("allocating scratch"))?,
            );
        }
        if s.tickets.as_ref().is_none_or(|b| b.len() < tickets) {
            s.tickets = Some(
                self.stream
                    .alloc_zeros::<u32>(tickets.next_power_of_two())
                    .map_err(Error::driver("allocating tickets"))?,
            );
        }
        Ok(s)
    }

    /// Allocates `len` zeroed f32s on the device.
    pub(crate) fn zeros_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(Error::driver("allocating device memory"))
    }

    /// Copies host f32s to a new device buffer.
    pub(crate) fn upload_f32(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        if data.is_empty() {
            return self.zeros_f32(1);
        }
        self.stream
            .clone_htod(data)
            .map_err(Error::driver("copying to the device"))
    }

    /// Copies the first `len` elements of a device f32 buffer to the host.
    pub(crate) fn download_f32(&self, buf: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>> {
        let mut v = self
            .stream
            .clone_dtoh(buf)
            .map_err(Error::driver("copying to the host"))?;
        v.truncate(len);
        Ok(v)
    }
}
