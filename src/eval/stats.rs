//! Small statistics for evaluation: means, percentile-bootstrap confidence intervals over
//! samples, and Student-t intervals over seeds (few seeds make a bootstrap meaningless).

use rand::{Rng, SeedableRng};

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample standard deviation (n − 1); 0 for fewer than two values.
pub fn sample_std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// 95 % percentile-bootstrap interval of the mean: `resamples` resamples with replacement,
/// deterministic for a seed. A single value gives a zero-width interval.
pub fn bootstrap_ci(v: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    if v.len() < 2 {
        let m = mean(v);
        return (m, m);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = v.len();
    let mut means: Vec<f64> = (0..resamples.max(1)).map(|_| (0..n).map(|_| v[rng.gen_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| means[((p * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (q(0.025), q(0.975))
}

/// Two-sided 97.5 % quantile of Student's t with `df` degrees of freedom.
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052,
        2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        _ => 1.96,
    }
}

/// Mean and 95 % Student-t interval over independent runs (seeds). One run: zero width.
pub fn t_ci(v: &[f64]) -> (f64, f64, f64) {
    let m = mean(v);
    if v.len() < 2 {
        return (m, m, m);
    }
    let h = t975(v.len() - 1) * sample_std(v) / (v.len() as f64).sqrt();
    (m, m - h, m + h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_and_t_interval() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(mean(&v), 2.5);
        assert!((sample_std(&v) - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        let (m, lo, hi) = t_ci(&v);
        let h = 3.182 * (5.0f64 / 3.0).sqrt() / 2.0;
        assert!((m - 2.5).abs() < 1e-12 && (lo - (2.5 - h)).abs() < 1e-9 && (hi - (2.5 + h)).abs() < 1e-9);
        assert_eq!(t_ci(&[0.7]), (0.7, 0.7, 0.7));
        assert_eq!(t975(100), 1.96);
    }

    #[test]
    fn bootstrap_brackets_the_mean_and_shrinks_with_n() {
        let small: Vec<f64> = (0..16).map(|i| (i % 4) as f64).collect();
        let big: Vec<f64> = (0..1024).map(|i| (i % 4) as f64).collect();
        let (a, b) = bootstrap_ci(&small, 2000, 1);
        let (c, d) = bootstrap_ci(&big, 2000, 1);
        assert!(a < 1.5 && 1.5 < b, "{a} {b}");
        assert!(c < 1.5 && 1.5 < d);
        assert!(d - c < (b - a) / 4.0, "CI should shrink ~ 1/sqrt(n): {} vs {}", d - c, b - a);
        // The normal approximation: half-width ≈ 1.96·σ/√n (σ of {0,1,2,3} = 1.118).
        let expect = 1.96 * 1.118 / (1024f64).sqrt();
        assert!(((d - c) / 2.0 - expect).abs() < 0.25 * expect, "{} vs {expect}", (d - c) / 2.0);
        assert_eq!(bootstrap_ci(&small, 500, 9), bootstrap_ci(&small, 500, 9), "deterministic for a seed");
        assert_eq!(bootstrap_ci(&[0.3], 100, 0), (0.3, 0.3));
        let same = [0.5; 10];
        assert_eq!(bootstrap_ci(&same, 100, 0), (0.5, 0.5));
    }

    /// Coverage on a known distribution: for Bernoulli(0.3) samples of n = 60, the 95 %
    /// percentile-bootstrap interval should contain 0.3 in about 95 % of repetitions
    /// (percentile intervals run a little narrow at small n, hence the lower bound 0.88).
    #[test]
    fn bootstrap_covers_a_known_mean() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let reps = 300;
        let mut hit = 0;
        for r in 0..reps {
            let v: Vec<f64> = (0..60).map(|_| if rng.gen::<f64>() < 0.3 { 1.0 } else { 0.0 }).collect();
            let (lo, hi) = bootstrap_ci(&v, 1000, r as u64);
            hit += (lo <= 0.3 && 0.3 <= hi) as usize;
        }
        let cov = hit as f64 / reps as f64;
        assert!((0.88..=0.99).contains(&cov), "coverage {cov}");
    }
}
