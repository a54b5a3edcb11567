//! senet's CPU path on PyTorch's own OpenMP threads.
//!
//! senet parallelizes with rayon; PyTorch's CPU kernels with OpenMP. Two pools on the same cores
//! fight: after every parallel torch op (the convolution before an SE block, say) libgomp's
//! workers spin for a while waiting for the next region, on the cores rayon's workers then need,
//! and the SE op runs on fewer cores than it was planned for. Measured on a 2-core machine inside
//! timm's seresnet50 training step (batch 8): senet's 16 SE forwards took 48-75 ms against 23 ms
//! with `OMP_WAIT_POLICY=PASSIVE`, and 42% of a stage-4 op profile was libgomp spinning.
//!
//! So each CPU call runs inside an OpenMP parallel region of the OpenMP runtime torch already
//! loaded (`GOMP_parallel`, found with `dlsym`; torch's spinning workers join it at once), and
//! the region's threads host a rayon pool built for that call: every OpenMP thread runs one of
//! its workers (`ThreadBuilder::run`), the work is spawned into it, and the pool winds down when
//! the work is done, which ends the region. senet's code is unchanged: it sees a rayon pool of
//! torch's thread count (`torch.set_num_threads`).
//!
//! Where no OpenMP runtime is loaded (a torch built without it; any non-Unix build), when called
//! from inside a rayon pool, or with [`set_pool`]`("rayon")`, the call runs on rayon's global
//! pool as before. The pool's workers run on the OpenMP threads' stacks (`OMP_STACKSIZE`; glibc's
//! default 8 MiB), not rayon's.

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};

use rayon::{ThreadBuilder, ThreadPoolBuilder};

type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
type IntFn = unsafe extern "C" fn() -> c_int;

/// The OpenMP entry points this module calls.
struct Omp {
    parallel: ParallelFn,
    thread_num: IntFn,
    num_threads: IntFn,
}

/// The process's OpenMP runtime (torch's libgomp), if one is loaded with global symbols.
#[cfg(not(unix))]
fn omp() -> Option<&'static Omp> {
    None
}

/// The process's OpenMP runtime (torch's libgomp), if one is loaded with global symbols.
#[cfg(unix)]
fn omp() -> Option<&'static Omp> {
    static OMP: OnceLock<Option<Omp>> = OnceLock::new();
    OMP.get_or_init(|| {
        let sym = |name: &CStr| {
            // SAFETY: dlsym with RTLD_DEFAULT only looks a name up.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (parallel, thread_num, num_threads) = (
            sym(c"GOMP_parallel")?,
            sym(c"omp_get_thread_num")?,
            sym(c"omp_get_num_threads")?,
        );
        // SAFETY: these are the OpenMP ABI's functions with these signatures (libgomp's
        // GOMP_parallel, and the OpenMP API's omp_get_*; LLVM's and Intel's runtimes export the
        // same GOMP_ entry points).
        unsafe {
            Some(Omp {
                parallel: std::mem::transmute::<*mut c_void, ParallelFn>(parallel),
                thread_num: std::mem::transmute::<*mut c_void, IntFn>(thread_num),
                num_threads: std::mem::transmute::<*mut c_void, IntFn>(num_threads),
            })
        }
    })
    .as_ref()
}

static USE_RAYON: AtomicBool = AtomicBool::new(false);

/// Chooses the threads CPU calls run on: `"openmp"` (torch's, the default) or `"rayon"`
/// (rayon's global pool), for benchmarks that compare the two.
pub(crate) fn set_pool(name: &str) -> Result<(), String> {
    match name {
        "openmp" => USE_RAYON.store(false, Ordering::Relaxed),
        "rayon" => USE_RAYON.store(true, Ordering::Relaxed),
        _ => {
            return Err(format!(
                "senet: unknown thread pool `{name}` (openmp, rayon)"
            ))
        }
    }
    Ok(())
}

/// The OpenMP runtime CPU calls run on, unless none is found or [`set_pool`] chose rayon.
fn active() -> Option<&'static Omp> {
    omp().filter(|_| !USE_RAYON.load(Ordering::Relaxed))
}

/// Which pool CPU calls run on now: "openmp" when torch's OpenMP runtime is found and not
/// switched off, else "rayon".
pub(crate) fn pool() -> &'static str {
    if active().is_some() {
        "openmp"
    } else {
        "rayon"
    }
}

type Work = Box<dyn FnOnce() + Send + 'static>;

/// What the threads of one parallel region share.
struct Region {
    work: Mutex<Option<Work>>,
    slots: Mutex<Slots>,
    ready: Condvar,
}

struct Slots {
    /// The pool's workers, by index; OpenMP thread i runs worker i.
    builders: Vec<Option<ThreadBuilder>>,
    /// Set by thread 0 once `builders` is final (or the pool could not be built).
    published: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Publishes the slots when thread 0 leaves its setup, also by an early return or a panic, so
/// that no thread of the region waits forever.
struct Publish<'a>(&'a Region);

impl Drop for Publish<'_> {
    fn drop(&mut self) {
        lock(&self.0.slots).published = true;
        self.0.ready.notify_all();
    }
}

impl Region {
    fn enter(&self, omp: &Omp) {
        // SAFETY: called inside the parallel region GOMP_parallel runs this body in.
        let (me, team) = unsafe { ((omp.thread_num)(), (omp.num_threads)()) };
        let me = usize::try_from(me).unwrap_or(0);
        if me == 0 {
            self.lead(usize::try_from(team).unwrap_or(1).max(1));
        } else {
            let mine = {
                let mut s = lock(&self.slots);
                while !s.published {
                    s = self.ready.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                s.builders.get_mut(me).and_then(Option::take)
            };
            if let Some(worker) = mine {
                worker.run();
            }
        }
    }

    /// Thread 0: builds the pool over the team, spawns the work into it and works in it.
    fn lead(&self, team: usize) {
        let publish = Publish(self);
        let Some(work) = lock(&self.work).take() else {
            return;
        };
        let built = ThreadPoolBuilder::new()
            .num_threads(team)
            .spawn_handler(|worker| {
                let mut s = lock(&self.slots);
                let i = worker.index();
                if s.builders.len() <= i {
                    s.builders.resize_with(i + 1, || None);
                }
                s.builders[i] = Some(worker);
                Ok(())
            })
            .build();
        match built {
            Ok(pool) => {
                // The pool stays alive until the spawned work has run, then its workers return.
                pool.spawn(work);
                drop(pool);
                let mine = lock(&self.slots)
                    .builders
                    .first_mut()
                    .and_then(Option::take);
                drop(publish);
                if let Some(worker) = mine {
                    worker.run();
                }
            }
            Err(_) => {
                drop(publish);
                work();
            }
        }
    }
}

extern "C" fn region_body(data: *mut c_void) {
    // SAFETY: `data` is the `Region` `run` passed to GOMP_parallel, alive until it returns.
    let region = unsafe { &*(data as *const Region) };
    if let Some(omp) = omp() {
        // A panic must not unwind into the OpenMP runtime; `run` reports a missing result.
        let _ = catch_unwind(AssertUnwindSafe(|| region.enter(omp)));
    }
}

/// Runs `f` on torch's OpenMP threads (see the module docs), or on rayon's global pool where
/// that is not possible. Returns `f`'s result (a panic in `f` is re-raised here), or an error
/// if the region lost the work (a panic in the region's own setup; not expected).
///
/// `serial` asks for one thread (a problem too small to gain from more: waking torch's sleeping
/// workers would cost more than the work).
pub(crate) fn run<R: Send + 'static>(
    serial: bool,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    let omp = match active() {
        Some(omp) if rayon::current_thread_index().is_none() => omp,
        _ => return Ok(f()),
    };
    let out: Arc<Mutex<Option<std::thread::Result<R>>>> = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&out);
    let work: Work = Box::new(move || {
        // A panic inside a rayon spawn would abort the process: catch it and hand it back.
        let r = catch_unwind(AssertUnwindSafe(f));
        *lock(&slot) = Some(r);
    });
    let region = Region {
        work: Mutex::new(Some(work)),
        slots: Mutex::new(Slots {
            builders: Vec::new(),
            published: false,
        }),
        ready: Condvar::new(),
    };
    // SAFETY: GOMP_parallel runs `region_body` on each thread of a new team (0 threads: the
    // default count, torch's `set_num_threads` on this thread) and returns after all of them have
    // finished, so `region` outlives every use of the pointer.
    unsafe {
        let data = &region as *const Region as *mut c_void;
        (omp.parallel)(region_body, data, c_uint::from(serial), 0);
    }
    if let Some(work) = lock(&region.work).take() {
        // The region never started the work: run it here.
        work();
    }
    let result = lock(&out).take();
    match result {
        Some(Ok(r)) => Ok(r),
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => Err("senet: the OpenMP region lost the CPU work (a panic in its setup)".into()),
    }
}
