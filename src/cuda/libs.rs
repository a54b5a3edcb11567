//! Whether the CUDA libraries load, probed without cudarc's loader.
//!
//! cudarc's run-time loader panics on a missing library, and its `is_culib_present` / `culib`
//! functions do not exist at all when another crate in the build turns on cudarc's
//! `dynamic-linking` feature (candle's `cuda` feature does). So senet opens the library itself
//! with `libloading`, under names cudarc also tries (for CUDA 12 and 13 bindings): when this probe
//! finds a library, cudarc's loader finds it too. Under `dynamic-linking` the library is already
//! mapped into the process and the probe returns it.

use libloading::Library;

/// The file names tried for library `stem` (`"cuda"`, `"cublas"`, `"cudnn"`): the unversioned
/// name, then the sonames of the major versions in use (newest first).
fn candidates(stem: &str) -> Vec<String> {
    if cfg!(windows) {
        let mut v = vec![format!("{stem}.dll"), format!("nv{stem}.dll")];
        for major in ["13", "12", "11", "9"] {
            v.push(format!("{stem}64_{major}.dll"));
        }
        return v;
    }
    let mut v = vec![format!("lib{stem}.so")];
    for major in ["1", "13", "12", "11", "10", "9"] {
        v.push(format!("lib{stem}.so.{major}"));
    }
    v
}

/// Opens library `stem` under the first name that loads, or `None`.
pub(crate) fn open(stem: &str) -> Option<Library> {
    candidates(stem).into_iter().find_map(|name| {
        // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions;
        // cudarc loads the same file the same way moments later.
        unsafe { Library::new(&name) }.ok()
    })
}

#[cfg(feature = "nn")]
/// The first of `symbols` that `lib` lacks, if any.
pub(crate) fn missing_symbol<'a>(lib: &Library, symbols: &[&'a str]) -> Option<&'a str> {
    symbols.iter().copied().find(|name| {
        // SAFETY: a lookup only; the symbol is not called through this type.
        unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_start_with_the_plain_name() {
        let c = candidates("cuda");
        assert!(!c.is_empty());
        if !cfg!(windows) {
            assert_eq!(c[0], "libcuda.so");
            assert!(c.contains(&"libcuda.so.1".to_string()));
        }
    }

    #[test]
    fn a_missing_library_is_none() {
        assert!(open("senet-no-such-library").is_none());
    }
}
