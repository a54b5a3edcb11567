//! The crate's one error type.

/// Everything that can go wrong in `senet`. Library code returns these; it never panics on bad
/// input or on a machine without a GPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor shape is invalid (a zero-sized dimension, an overflowing element count) or does
    /// not match what the operation expects.
    #[error("invalid shape: {0}")]
    Shape(String),
    /// A buffer holds a different number of elements than its shape or config requires.
    #[error("length mismatch: {what} has {got} elements, expected {expected}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Elements it has.
        got: usize,
        /// Elements it should have.
        expected: usize,
    },
    /// An SE configuration or an option is invalid (zero channels, hidden width 0, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No CUDA driver library (libcuda) could be loaded on this machine.
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    /// The driver loaded but reports no CUDA device (or not the requested ordinal).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// The crate was built without nvcc, so it carries no GPU kernels.
    #[error(
        "CUDA kernels were not built: no nvcc was found when this crate was compiled \
         (install CUDA or run scripts/install-cuda-toolchain.sh, then rebuild)"
    )]
    KernelsNotBuilt,
    /// The device is older than the kernels support (compute capability 8.0 or newer).
    #[error("unsupported device: {0}")]
    UnsupportedDevice(String),
    /// An error reported by the CUDA driver, with the operation that hit it.
    #[error("CUDA driver error during {context}: {source}")]
    Driver {
        /// What the crate was doing.
        context: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A kernel failed while running (reported by the CPU emulator: a divergent barrier, an
    /// invalid shared-memory mapping).
    #[error("kernel failed: {0}")]
    KernelFailed(String),
    /// An error reported by cuDNN, with the operation that hit it.
    #[error("cuDNN error during {0}")]
    Cudnn(String),
    /// The request is valid in principle but not supported by this build or path.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An I/O error, with the path or operation involved.
    #[error("{context}: {source}")]
    Io {
        /// The file or operation.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint or data file is malformed or does not match the model.
    #[error("{0}")]
    Format(String),
    /// An operand lives on another device than the op runs on (another GPU or context, the
    /// emulator vs a GPU, or memory no device knows). Nothing was queued or written.
    #[error("wrong device for {operand}: {detail}")]
    WrongDevice {
        /// Which operand (`x`, `residual`, `dy`, `w1`, `workspace`, ...).
        operand: &'static str,
        /// Where it lives and where the op runs.
        detail: String,
    },
    /// Memory for a buffer could not be had (the size comes from the caller: a shape, a batch).
    #[error("out of memory: {what} needs {bytes} bytes")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// Bytes asked for.
        bytes: usize,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a driver error with the operation that produced it.
    pub(crate) fn driver(
        context: impl Into<String>,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        let context = context.into();
        move |source| Error::Driver { context, source }
    }

    /// Wraps an I/O error with the file or operation involved.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// True for the errors that mean "this machine has no usable GPU" (no driver, no device, no
    /// kernels built), as opposed to a failure on a GPU that exists.
    pub fn is_no_gpu(&self) -> bool {
        matches!(
            self,
            Error::NoDriver(_) | Error::NoDevice(_) | Error::KernelsNotBuilt
        )
    }
}
