//! A handle on one CUDA device (or on the CPU emulator of the kernels): its context, one stream,
//! cached kernel modules, scratch memory, and the few memory and launch operations the crate
//! needs.

use super::buf::{Buf, DevElem, HostBuf};
use super::kargs::Kernel;
use super::view::DeviceId;
use super::Module;
use crate::error::{Error, Result};
use cudarc::driver::sys::{CUdevice_attribute as Attr, CUfunction_attribute as FnAttr};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, LaunchConfig};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// The most blocks a grid may have along y and along z (65,535 on every CUDA GPU; the
    /// emulator says 1,024, so tests reach the chunking paths on small shapes).
    pub max_grid_yz: u32,
    /// Driver version as reported by the driver (e.g. 13000 for CUDA 13.0); 0 for the emulator.
    pub driver_version: i32,
}

struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<[Option<Arc<CudaModule>>; Module::COUNT]>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

enum Backend {
    Cuda(Cuda),
    /// The emulator instance `id`; `queue` serialises its launches and copies as a stream would.
    Emulator {
        id: u64,
        queue: Mutex<()>,
    },
}

/// The emulator's grid.y / grid.z limit (a GPU's is 65,535): small, so that tests reach every
/// path that splits a launch over the grid limit on small shapes; launches beyond it fail, as
/// on a GPU.
const EMULATOR_MAX_GRID_YZ: u32 = 1024;

/// Emulator instances made so far (each gets the next number as its identity).
static EMULATORS: AtomicU64 = AtomicU64::new(0);

/// Dynamic shared memory a kernel may use per CTA before its limit must be raised.
const DEFAULT_SMEM_LIMIT: u32 = 48 << 10;

/// A CUDA device handle. Cheap to share (`Arc`); every operation runs on its one stream, in
/// order, and the host waits only where it needs data back. The stream is the handle's own
/// ([`CudaDevice::new`]) or a caller's ([`CudaDevice::from_stream`],
/// [`CudaDevice::from_raw_stream`]): a framework that owns the stream and the memory hands both
/// in, and senet's launches and copies are queued on that stream with the framework's work.
///
/// # The asynchronous contract
/// An op returns once its launches (and any device-side copies or fills) are queued: the results
/// are ready after the stream has reached that point. Nothing synchronises the device or the
/// stream except where a method says so ([`CudaDevice::synchronize`], and the copies to the host,
/// which wait for the stream).
///
/// [`CudaDevice::emulator`] gives a handle whose kernels run on the CPU: the same kernel
/// sources compiled by the host C++ compiler, run one fiber per CUDA thread. It exists so the
/// kernels and their launch logic are tested on machines without a GPU; it is slow.
pub struct CudaDevice {
    backend: Backend,
    info: DeviceInfo,
    /// The SE op's workspace for calls that do not bring their own (grown as needed).
    workspace: Mutex<Option<Buf<u8>>>,
    clusters: Mutex<HashMap<(String, u32), usize>>,
    /// Each kernel's dynamic shared-memory limit as raised so far (absent: the default 48 KiB).
    /// The limit is a property of the function, shared by every launch and occupancy query, so
    /// it only ever grows: lowering it for a smaller request would fail a later launch that
    /// needs more (CUDA_ERROR_INVALID_VALUE).
    smem_limits: Mutex<HashMap<String, u32>>,
    /// Buffers allocated through this handle so far.
    allocs: AtomicUsize,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.info)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CudaDevice {
    /// Opens device `ordinal` (its primary context, the one PyTorch and candle use) with a stream
    /// of its own. Errors (never panics) with [`Error::NoDriver`] when libcuda cannot be loaded,
    /// [`Error::NoDevice`] when there is no such device, and [`Error::UnsupportedDevice`] below
    /// compute capability 8.0.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        let ctx = open_context(ordinal)?;
        let stream = ctx
            .new_stream()
            .map_err(Error::driver("creating a stream"))?;
        Self::with_stream(stream)
    }

    /// A handle on the caller's stream (and so its context and device): every launch and copy
    /// of this handle is queued on `stream`, after the caller's work already there, and senet's
    /// kernel modules load into the stream's context. Nothing is synchronised.
    ///
    /// Errors as [`CudaDevice::new`] does for the device.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Arc<Self>> {
        Self::with_stream(stream)
    }

    /// A handle on a stream created by another library (another cudarc version, PyTorch's
    /// `torch.cuda.current_stream().cuda_stream`): the stream is borrowed, never destroyed, and
    /// runs in device `ordinal`'s primary context.
    ///
    /// # Safety
    /// `stream` must be a valid stream of device `ordinal`'s primary context (or null, the
    /// legacy default stream), and must outlive this handle and every op queued through it.
    pub unsafe fn from_raw_stream(
        stream: cudarc::driver::sys::CUstream,
        ordinal: usize,
    ) -> Result<Arc<Self>> {
        let ctx = open_context(ordinal)?;
        // SAFETY: forwarded from this function's contract.
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        Self::with_stream(stream)
    }

    fn with_stream(stream: Arc<CudaStream>) -> Result<Arc<Self>> {
        let ctx = stream.context().clone();
        let ordinal = ctx.ordinal();
        ctx.bind_to_thread()
            .map_err(Error::driver("binding the context"))?;
        let attr = |a: Attr| {
            ctx.attribute(a)
                .map_err(Error::driver("reading device attributes"))
        };
        let cc = (
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        );
        let mut total_memory = 0usize;
        let mut driver_version = 0i32;
        // SAFETY: the context is bound to this thread (above); each call writes one value
        // through a valid pointer.
        unsafe {
            cudarc::driver::sys::cuDeviceTotalMem_v2(&mut total_memory, ctx.cu_device())
                .result()
                .map_err(Error::driver("reading total memory"))?;
            cudarc::driver::sys::cuDriverGetVersion(&mut driver_version)
                .result()
                .map_err(Error::driver("reading the driver version"))?;
        }
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
            total_memory,
            max_grid_yz: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?
                .min(attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)?)
                as u32,
            driver_version,
        };
        if cc.0 < 8 {
            return Err(Error::UnsupportedDevice(format!(
                "{} has compute capability {}.{}; senet's kernels need 8.0 or newer",
                info.name, cc.0, cc.1
            )));
        }
        Ok(Arc::new(CudaDevice {
            backend: Backend::Cuda(Cuda {
                ctx,
                stream,
                modules: Mutex::new(Default::default()),
                functions: Mutex::new(HashMap::new()),
            }),
            info,
            workspace: Mutex::new(None),
            clusters: Mutex::new(HashMap::new()),
            smem_limits: Mutex::new(HashMap::new()),
            allocs: AtomicUsize::new(0),
        }))
    }

    /// A handle on the CPU emulator of the kernels: it presents itself as a small sm_90 device
    /// (4 SMs, 4 MiB of L2, 227 KiB of shared memory per block) so every path, the cluster
    /// kernels included, runs. [`Error::Unsupported`] if this build has no emulator (no host
    /// C++ compiler at build time).
    pub fn emulator() -> Result<Arc<Self>> {
        if !super::emu::available() {
            return Err(Error::Unsupported(
                "this build has no kernel emulator (no C++ compiler at build time)".into(),
            ));
        }
        Ok(Arc::new(CudaDevice {
            backend: Backend::Emulator {
                id: EMULATORS.fetch_add(1, Ordering::Relaxed) + 1,
                queue: Mutex::new(()),
            },
            info: DeviceInfo {
                ordinal: 0,
                name: "senet CPU emulator".into(),
                compute_capability: (9, 0),
                sm_count: 4,
                l2_bytes: 4 << 20,
                max_smem_per_block: 227 << 10,
                total_memory: 16 << 30,
                max_grid_yz: EMULATOR_MAX_GRID_YZ,
                driver_version: 0,
            },
            workspace: Mutex::new(None),
            clusters: Mutex::new(HashMap::new()),
            smem_limits: Mutex::new(HashMap::new()),
            allocs: AtomicUsize::new(0),
        }))
    }

    /// The device's properties.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// True for the CPU emulator.
    pub fn is_emulator(&self) -> bool {
        matches!(self.backend, Backend::Emulator { .. })
    }

    /// This handle's device: buffers and views of another are refused by every op.
    pub fn id(&self) -> DeviceId {
        match &self.backend {
            Backend::Cuda(c) => DeviceId::Cuda {
                ordinal: c.ctx.ordinal(),
                context: c.ctx.cu_ctx() as usize,
            },
            Backend::Emulator { id, .. } => DeviceId::Emulator(*id),
        }
    }

    /// The device a raw address belongs to, as the driver reports it; on the emulator, this one.
    pub(crate) fn owner_of_address(&self, addr: u64) -> DeviceId {
        let Backend::Cuda(c) = &self.backend else {
            return self.id();
        };
        use cudarc::driver::sys::CUpointer_attribute as P;
        let mut ordinal: i32 = -1;
        let mut context: cudarc::driver::sys::CUcontext = std::ptr::null_mut();
        if c.ctx.bind_to_thread().is_err() {
            return DeviceId::Unknown;
        }
        // SAFETY: each query writes one value of the attribute's documented type through a
        // valid pointer; an address the driver does not know is an error, not a fault.
        let known = unsafe {
            cudarc::driver::sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                addr,
            )
            .result()
            .is_ok()
                && cudarc::driver::sys::cuPointerGetAttribute(
                    (&mut context as *mut cudarc::driver::sys::CUcontext).cast(),
                    P::CU_POINTER_ATTRIBUTE_CONTEXT,
                    addr,
                )
                .result()
                .is_ok()
        };
        if !known || ordinal < 0 {
            return DeviceId::Unknown;
        }
        // Pool and virtual-memory allocations report no context: they are the device's.
        let context = if context.is_null() && ordinal as usize == c.ctx.ordinal() {
            c.ctx.cu_ctx() as usize
        } else {
            context as usize
        };
        DeviceId::Cuda {
            ordinal: ordinal as usize,
            context,
        }
    }

    /// The stream every operation of this handle runs on (`None` for the emulator).
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.backend {
            Backend::Cuda(c) => Some(&c.stream),
            Backend::Emulator { .. } => None,
        }
    }

    /// The cudarc context (`None` for the emulator).
    pub fn context(&self) -> Option<&Arc<CudaContext>> {
        match &self.backend {
            Backend::Cuda(c) => Some(&c.ctx),
            Backend::Emulator { .. } => None,
        }
    }

    /// Blocks until all work queued on this handle's stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        match &self.backend {
            Backend::Cuda(c) => c
                .stream
                .synchronize()
                .map_err(Error::driver("synchronizing the stream")),
            Backend::Emulator { .. } => Ok(()),
        }
    }

    /// True for Hopper (sm_90) and newer with the cluster kernels built (always for the
    /// emulator).
    pub fn has_clusters(&self) -> bool {
        match self.backend {
            Backend::Cuda(_) => {
                self.info.compute_capability.0 >= 9 && !Module::Fused.fatbin().is_empty()
            }
            Backend::Emulator { .. } => true,
        }
    }

    fn function(c: &Cuda, module: Module, name: &str) -> Result<CudaFunction> {
        let mut fns = lock(&c.functions);
        if let Some(f) = fns.get(name) {
            return Ok(f.clone());
        }
        let m = {
            let mut mods = lock(&c.modules);
            match &mods[module.index()] {
                Some(m) => m.clone(),
                None => {
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
                    let m = c
                        .ctx
                        .load_module(Ptx::from_binary(bytes.to_vec()))
                        .map_err(Error::driver(format!(
                            "loading kernel module {}",
                            module.name()
                        )))?;
                    mods[module.index()] = Some(m.clone());
                    m
                }
            }
        };
        let f = m
            .load_function(name)
            .map_err(Error::driver(format!("loading kernel {name}")))?;
        fns.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Launches kernel `K` with the arguments `k`: `ty` is the activation type's suffix (`f32`,
    /// `bf16`, `f16`) for a kernel instantiated per type, `None` for one that is not. `cluster`
    /// is the kernel's compile-time cluster size (1 for none); `smem` the dynamic shared memory,
    /// which raises the kernel's limit first when above 48 KiB. Queued on the device's stream.
    ///
    /// # Safety
    /// Every device address in `k` must cover what the kernel reads and writes for the sizes
    /// among its arguments (the argument order and types are checked at compile time).
    pub(crate) unsafe fn launch_kernel<K: Kernel>(
        &self,
        k: &K,
        ty: Option<&str>,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        cluster: u32,
    ) -> Result<()> {
        let name = match (K::TYPED, ty) {
            (true, Some(t)) => format!("{}_{t}", K::NAME),
            (false, None) => K::NAME.to_string(),
            (typed, _) => {
                let per = if typed { "" } else { "not " };
                return Err(Error::Config(format!(
                    "kernel {}: launched with type suffix {ty:?}, but it is {per}instantiated \
                     per type",
                    K::NAME
                )));
            }
        };
        let mut args = k.args();
        // SAFETY: the arguments match the kernel's parameters by construction (generated from
        // its source); the addresses per this function's contract.
        unsafe { self.launch(K::MODULE, &name, grid, block, smem, cluster, &mut args) }
    }

    /// Launches kernel `name` of `module` with `args` (see [`CudaDevice::launch_kernel`]).
    ///
    /// # Safety
    /// `args` must point to values whose types and order match the kernel's parameters, and
    /// every device address among them must cover what the kernel reads and writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        &self,
        module: Module,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        cluster: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        match &self.backend {
            Backend::Cuda(c) => {
                let f = Self::function(c, module, name)?;
                self.raise_smem_limit(Some(&f), name, smem)?;
                c.ctx
                    .bind_to_thread()
                    .map_err(Error::driver("binding the context"))?;
                // SAFETY: forwarded from the caller's contract; the stream belongs to ctx.
                unsafe {
                    cudarc::driver::result::launch_kernel(
                        f.cu_function(),
                        grid,
                        block,
                        smem,
                        c.stream.cu_stream(),
                        args,
                    )
                }
                .map_err(Error::driver(format!("launching {name}")))
            }
            Backend::Emulator { queue, .. } => {
                let threads = block.0 as u64 * block.1 as u64 * block.2 as u64;
                if grid.1 > self.info.max_grid_yz || grid.2 > self.info.max_grid_yz {
                    return Err(Error::KernelFailed(format!(
                        "{name}: grid {grid:?} exceeds the device's grid.y / grid.z limit of {}",
                        self.info.max_grid_yz
                    )));
                }
                if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || threads == 0 || threads > 1024 {
                    return Err(Error::KernelFailed(format!(
                        "{name}: invalid launch shape grid {grid:?} block {block:?}"
                    )));
                }
                // The driver refuses a launch above the function's shared-memory limit.
                let limit = lock(&self.smem_limits)
                    .get(name)
                    .copied()
                    .unwrap_or(DEFAULT_SMEM_LIMIT);
                if smem > limit {
                    return Err(Error::KernelFailed(format!(
                        "{name}: {smem} bytes of dynamic shared memory above the function's \
                         limit of {limit} (CUDA_ERROR_INVALID_VALUE on a GPU)"
                    )));
                }
                // In order, one at a time per emulator, as on a stream.
                let _queued = lock(queue);
                // SAFETY: forwarded from the caller's contract; emulator addresses are host
                // allocations owned by live buffers.
                unsafe { super::emu::launch(name, grid, block, smem, cluster, args) }
            }
        }
    }

    /// How many clusters of `kernel` with `smem` bytes of dynamic shared memory per CTA can be
    /// resident at once (0 if none fits).
    pub(crate) fn max_active_clusters(
        &self,
        module: Module,
        name: &str,
        cluster: u32,
        threads: u32,
        smem: u32,
    ) -> Result<usize> {
        let key = (name.to_string(), smem);
        if let Some(&n) = lock(&self.clusters).get(&key) {
            return Ok(n);
        }
        let n = self.query_active_clusters(module, name, cluster, threads, smem)?;
        lock(&self.clusters).insert(key, n);
        Ok(n)
    }

    fn query_active_clusters(
        &self,
        module: Module,
        name: &str,
        cluster: u32,
        threads: u32,
        smem: u32,
    ) -> Result<usize> {
        match &self.backend {
            Backend::Cuda(c) => {
                let f = Self::function(c, module, name)?;
                self.raise_smem_limit(Some(&f), name, smem)?;
                let probe = LaunchConfig {
                    grid_dim: (cluster, 1, 1),
                    block_dim: (threads, 1, 1),
                    shared_mem_bytes: smem,
                };
                Ok(f.occupancy_max_active_clusters(probe, &c.stream)
                    .map_err(Error::driver("querying cluster occupancy"))?
                    as usize)
            }
            Backend::Emulator { .. } => Ok(if smem as usize <= self.info.max_smem_per_block {
                self.raise_smem_limit(None, name, smem)?;
                2
            } else {
                0
            }),
        }
    }

    /// Raises kernel `name`'s dynamic shared-memory limit to `smem` bytes if it is lower; never
    /// lowers it (see `smem_limits`). `f`: the loaded function (None on the emulator, which
    /// only records the limit and checks launches against it).
    fn raise_smem_limit(&self, f: Option<&CudaFunction>, name: &str, smem: u32) -> Result<()> {
        if smem <= DEFAULT_SMEM_LIMIT {
            return Ok(());
        }
        // Held while the driver is told, so that two threads never leave it at the lower value.
        let mut limits = lock(&self.smem_limits);
        if limits.get(name).is_some_and(|&l| l >= smem) {
            return Ok(());
        }
        if let Some(f) = f {
            f.set_attribute(
                FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(Error::driver(format!(
                "raising {name}'s shared-memory limit"
            )))?;
        }
        limits.insert(name.to_string(), smem);
        Ok(())
    }

    // -------------------------------------------------------------------------- memory

    /// Device buffers allocated through this handle so far (by the crate's ops and scratch
    /// space; cuDNN's own allocations are not counted). A steady training step adds none.
    pub fn allocations(&self) -> usize {
        self.allocs.load(Ordering::Relaxed)
    }

    /// A zeroed buffer of `len` elements.
    pub(crate) fn alloc_zeros<T: DevElem>(&self, len: usize) -> Result<Buf<T>> {
        let len = len.max(1);
        self.allocs.fetch_add(1, Ordering::Relaxed);
        match &self.backend {
            Backend::Cuda(c) => c
                .stream
                .alloc_zeros::<T>(len)
                .map(Buf::Cuda)
                .map_err(Error::driver("allocating device memory")),
            Backend::Emulator { id, .. } => {
                HostBuf::zeros(len, *id)
                    .map(Buf::Host)
                    .ok_or_else(|| Error::OutOfMemory {
                        what: "emulator device buffer".into(),
                        bytes: len.saturating_mul(std::mem::size_of::<T>()),
                    })
            }
        }
    }

    /// A buffer holding a copy of `data`.
    pub(crate) fn upload<T: DevElem>(&self, data: &[T]) -> Result<Buf<T>> {
        let mut b = self.alloc_zeros::<T>(data.len())?;
        self.write(&mut b, 0, data)?;
        Ok(b)
    }

    /// Copies `data` into `buf[offset..]`.
    pub(crate) fn write<T: DevElem>(
        &self,
        buf: &mut Buf<T>,
        offset: usize,
        data: &[T],
    ) -> Result<()> {
        check_range(buf, offset, data.len())?;
        match (&self.backend, buf) {
            (Backend::Cuda(c), Buf::Cuda(s)) => {
                let mut view = s.slice_mut(offset..offset + data.len());
                c.stream
                    .memcpy_htod(data, &mut view)
                    .map_err(Error::driver("copying to the device"))
            }
            (Backend::Emulator { .. }, Buf::Host(h)) => {
                h.write(offset, data);
                Ok(())
            }
            _ => Err(foreign()),
        }
    }

    /// Copies `buf[offset..offset + len]` to the host (waits for the stream).
    pub(crate) fn read<T: DevElem>(
        &self,
        buf: &Buf<T>,
        offset: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        check_range(buf, offset, len)?;
        match (&self.backend, buf) {
            (Backend::Cuda(c), Buf::Cuda(s)) => {
                let view = s.slice(offset..offset + len);
                c.stream
                    .clone_dtoh(&view)
                    .map_err(Error::driver("copying to the host"))
            }
            (Backend::Emulator { .. }, Buf::Host(h)) => Ok(h.read(offset, len)),
            _ => Err(foreign()),
        }
    }

    /// Copies `len` elements from `src[src_off..]` to `dst[dst_off..]` on the device.
    pub(crate) fn copy<T: DevElem>(
        &self,
        src: &Buf<T>,
        src_off: usize,
        dst: &mut Buf<T>,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        check_range(src, src_off, len)?;
        check_range(dst, dst_off, len)?;
        match (&self.backend, src, dst) {
            (Backend::Cuda(c), Buf::Cuda(s), Buf::Cuda(d)) => {
                let from = s.slice(src_off..src_off + len);
                let mut to = d.slice_mut(dst_off..dst_off + len);
                c.stream
                    .memcpy_dtod(&from, &mut to)
                    .map_err(Error::driver("device-to-device copy"))
            }
            (Backend::Emulator { .. }, Buf::Host(s), Buf::Host(d)) => {
                d.copy_from(dst_off, s, src_off, len);
                Ok(())
            }
            _ => Err(foreign()),
        }
    }

    /// Sets elements `[offset, offset + len)` to the byte pattern `byte` (0xff: NaN in every
    /// float type, the poison the tests use).
    pub(crate) fn fill_bytes<T: DevElem>(
        &self,
        buf: &mut Buf<T>,
        offset: usize,
        len: usize,
        byte: u8,
    ) -> Result<()> {
        check_range(buf, offset, len)?;
        match (&self.backend, buf) {
            (Backend::Cuda(c), Buf::Cuda(s)) => {
                let (p, _sync) = s.device_ptr(&c.stream);
                let at = p + (offset * std::mem::size_of::<T>()) as u64;
                c.ctx
                    .bind_to_thread()
                    .map_err(Error::driver("binding the context"))?;
                // SAFETY: the range lies inside the allocation (checked) on this stream; every
                // bit pattern is a valid T.
                unsafe {
                    cudarc::driver::result::memset_d8_async(
                        at,
                        byte,
                        len * std::mem::size_of::<T>(),
                        c.stream.cu_stream(),
                    )
                }
                .map_err(Error::driver("filling device memory"))
            }
            (Backend::Emulator { .. }, Buf::Host(h)) => {
                h.fill_bytes(offset, len, byte);
                Ok(())
            }
            _ => Err(foreign()),
        }
    }

    /// The address of the buffer's first element, for kernel arguments.
    pub(crate) fn addr<T: DevElem>(&self, buf: &Buf<T>) -> u64 {
        match (&self.backend, buf) {
            (Backend::Cuda(c), Buf::Cuda(s)) => {
                let (p, _sync) = s.device_ptr(&c.stream);
                p
            }
            (_, Buf::Host(h)) => h.addr(),
            // A device buffer handed to the emulator: its address means nothing there. The ops
            // check every operand's owner (Buf::owner) before they get here.
            (Backend::Emulator { .. }, Buf::Cuda(s)) => {
                let (p, _sync) = s.device_ptr(s.stream());
                p
            }
        }
    }

    /// Sets `bytes` bytes at device address `addr` to `byte`, queued on the stream.
    ///
    /// # Safety
    /// `addr..addr + bytes` must be memory of this device that nothing else uses meanwhile.
    pub(crate) unsafe fn fill_raw(&self, addr: u64, bytes: usize, byte: u8) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        match &self.backend {
            Backend::Cuda(c) => {
                c.ctx
                    .bind_to_thread()
                    .map_err(Error::driver("binding the context"))?;
                // SAFETY: forwarded from this function's contract.
                unsafe {
                    cudarc::driver::result::memset_d8_async(addr, byte, bytes, c.stream.cu_stream())
                }
                .map_err(Error::driver("filling device memory"))
            }
            Backend::Emulator { queue, .. } => {
                let _queued = lock(queue);
                // SAFETY: forwarded from this function's contract (emulator memory is host
                // memory).
                unsafe { std::ptr::write_bytes(addr as *mut u8, byte, bytes) };
                Ok(())
            }
        }
    }

    /// Locks the handle's own workspace for the SE op, grown to at least `bytes` bytes.
    pub(crate) fn workspace(&self, bytes: usize) -> Result<MutexGuard<'_, Option<Buf<u8>>>> {
        let mut w = lock(&self.workspace);
        if w.as_ref().is_none_or(|b| b.len() < bytes.max(1)) {
            // Drop the old buffer first, so the peak is the new size alone.
            *w = None;
            *w = Some(self.alloc_zeros::<u8>(bytes.max(1).next_power_of_two())?);
        }
        Ok(w)
    }
}

/// Device `ordinal`'s primary context, after checking that the driver loads and the device
/// exists (cudarc's loader panics without libcuda).
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if super::libs::open("cuda").is_none() {
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
    CudaContext::new(ordinal).map_err(Error::driver("creating a context"))
}

fn check_range<T: DevElem>(buf: &Buf<T>, offset: usize, len: usize) -> Result<()> {
    if offset.checked_add(len).is_some_and(|end| end <= buf.len()) {
        Ok(())
    } else {
        Err(Error::Length {
            what: "device buffer range",
            got: buf.len(),
            expected: offset.saturating_add(len),
        })
    }
}

fn foreign() -> Error {
    Error::Config(
        "a buffer was used with a device handle of another kind (CUDA vs emulator)".into(),
    )
}
