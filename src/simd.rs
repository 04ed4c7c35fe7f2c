//! `simd_kernel!`: a loop kernel that runs compiled for AVX2 + FMA where the CPU has them.
//! The default build targets baseline x86-64 (SSE2), so without this the element loops of
//! the fused ops and the PSM backbone run at a quarter of the vector width gemm and
//! PyTorch use. The body is an `inline(always)` function, so it is compiled into the AVX2
//! variant (a closure passed to a target-feature function is not reliably inlined). Rust
//! never contracts a·b+c into an FMA and never reorders float sums, so both variants give
//! identical bits.
//!
//! `fn name<T>(…)` is generic over the caller's `Elem` float type; `fn name(…)` is not.

macro_rules! simd_kernel {
    ($(#[$m:meta])* fn $name:ident $(<$g:ident>)? ($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name $(<$g: Elem>)? ($($arg: $ty),*) {
            #[inline(always)]
            fn body $(<$g: Elem>)? ($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$g: Elem>)? ($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
