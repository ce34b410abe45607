//! Runtime CPU-feature dispatch for the hot loops.
//!
//! The loops are plain Rust over `[f32; N]` lanes that LLVM vectorises; compiling them
//! once per feature level and picking one at run time keeps the wheel portable (generic
//! x86-64) while using AVX-512 or AVX2 where the machine has it. Only `avx512f` (not the
//! whole Ice Lake set) is enabled for the top level: with the wider set LLVM prefers
//! 256-bit vectors and the relu-sum kernel ran 10x slower.

/// Defines `pub fn $name(args) -> ret` that calls `$body` (an `#[inline(always)]`
/// function) compiled for AVX-512F, AVX2+FMA, or the baseline, chosen per call.
macro_rules! dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use dispatch;
