//! Perceptual Structuring Module (PSM): frozen-backbone patch features → allocation map M
//! (docs/DESIGN.md §1.3).
//!
//! Pipeline for one image, every stage kept in [`MapStages`] so that `vipo map` can dump it and an
//! independent (PyTorch / scikit-learn / SciPy) implementation can check it stage by stage:
//!
//! 1. [`pca`] on the image's own N×D patch features (centred, sklearn conventions), K components:
//!    projections z_j and explained-variance ratios λ_j.
//! 2. [`remap_component`]: z'_j = (max z_j − z_j)/(max z_j − min z_j) ("more negative = subject").
//! 3. [`aggregate`]: Σ_j λ_j·z'_j (weighted), mean_j z'_j (average) or z'_1 (first); clip to [0,1].
//! 4. [`gaussian_smooth_2d`] on the h×w patch grid (σ in patches, 0 = off), then [`min_max`].
//! 5. [`resize_bilinear_antialias`] to the latent grid, then [`min_max`] again.
//!
//! Video: per-frame maps are combined by [`temporal_map`].
//!
//! Everything here is plain Rust on `Vec<f32>` with f64 accumulation; nothing enters autograd.

use crate::backbone::FeatureMap;
use anyhow::{bail, ensure, Result};

/// How the K remapped components are combined into one map (docs/DESIGN.md §1.3 step 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// S = Σ_j λ_j·z'_j with λ_j the explained-variance ratio (share of total variance). Default.
    #[default]
    Weighted,
    /// S = (1/K)·Σ_j z'_j (the paper's "average" ablation).
    Average,
    /// S = z'_1: first principal component only.
    First,
}

/// How each principal component's arbitrary sign is fixed before the released code's
/// reverse min–max remap ("more negative = subject").
///
/// PCA signs are arbitrary, so a rule that looks at the loadings (`sklearn`) decides
/// "subject" by the feature statistics, not by the image; on generated ShapeWorld samples it
/// put the map on the background (bench/NOTES.md §5). `minority` (the default) and `border`
/// decide from where the component is high in the image, so they are invariant to the sign;
/// on ShapeWorld renders and samples `minority` puts more mass on the objects (§5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Orient {
    /// Each component is oriented so that its remapped values are lower on the patches of the
    /// grid's outer ring than inside it: the side that covers the image border is background
    /// (subjects are framed, backgrounds touch the frame). A tie falls back to `minority`.
    Border,
    /// scikit-learn ≥ 1.5 (`svd_flip`, loadings-based): each component's largest-|loading|
    /// entry is positive. What the released code gets (the ablation).
    Sklearn,
    /// After the sklearn convention, flip a component whose remapped values average above
    /// 0.5, so the high end of the map is the minority of patches (subjects usually cover
    /// less of the image than the background). The default.
    #[default]
    Minority,
}

/// PSM settings (the `[psm]` table of the config).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PsmConfig {
    /// Number of principal components K kept (paper: 3). Must satisfy 1 ≤ K ≤ min(D, N).
    pub k: usize,
    /// How the components are combined (`"weighted"`, `"average"` or `"first"`).
    pub aggregation: Aggregation,
    /// Gaussian smoothing σ_s on the patch grid, in patches (paper: 1.0; 0 = off).
    pub sigma: f64,
    /// Component sign convention (`"sklearn"` or `"minority"`).
    pub orient: Orient,
}

impl Default for PsmConfig {
    fn default() -> Self {
        PsmConfig { k: 3, aggregation: Aggregation::Weighted, sigma: 1.0, orient: Orient::Minority }
    }
}

/// Should the remapped component `r` (h×w, row-major) be flipped (r → 1 − r) under `orient`?
/// Decided from the image layout only, so that flipping the sign of the component (which turns
/// r into exactly 1 − r) flips the decision too and the oriented result is the same.
fn should_flip(r: &[f32], h: usize, w: usize, orient: Orient) -> bool {
    let n = r.len();
    let minority = || r.iter().map(|&v| v as f64).sum::<f64>() > 0.5 * n as f64;
    match orient {
        Orient::Sklearn => false,
        Orient::Minority => minority(),
        Orient::Border => {
            if h < 3 || w < 3 {
                return minority(); // no interior to compare the ring with
            }
            let (mut ring, mut n_ring, mut inner, mut n_inner) = (0f64, 0usize, 0f64, 0usize);
            for y in 0..h {
                for x in 0..w {
                    let v = r[y * w + x] as f64;
                    if y == 0 || x == 0 || y + 1 == h || x + 1 == w {
                        ring += v;
                        n_ring += 1;
                    } else {
                        inner += v;
                        n_inner += 1;
                    }
                }
            }
            let (ring, inner) = (ring / n_ring as f64, inner / n_inner as f64);
            // Rounding of 1 − r can move both means by ~1e-7; closer than that is a tie.
            if (ring - inner).abs() <= 1e-6 {
                minority()
            } else {
                ring > inner
            }
        }
    }
}

impl PsmConfig {
    /// Checks the settings against the backbone's feature width `d`
    /// (k ≥ 1, k ≤ d, σ finite and ≥ 0). The bound k ≤ N (patches per image) is checked
    /// by [`pca`] once N is known, with the same field name.
    pub fn validate(&self, d: usize) -> Result<()> {
        ensure!(self.k >= 1, "psm.k must be at least 1 (got {})", self.k);
        ensure!(self.k <= d, "psm.k = {} exceeds the backbone feature width D = {d}", self.k);
        ensure!(self.sigma.is_finite() && self.sigma >= 0.0, "psm.sigma must be finite and >= 0 (got {})", self.sigma);
        Ok(())
    }
}

/// Result of [`pca`] (scikit-learn `PCA(n_components=k)` conventions, sklearn ≥ 1.5 signs).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pca {
    /// Number of samples (patches) N.
    pub n: usize,
    /// Feature width D.
    pub d: usize,
    /// Components kept K.
    pub k: usize,
    /// Per-feature mean (D) subtracted before the decomposition (sklearn `mean_`).
    pub mean: Vec<f32>,
    /// K×D row-major unit loading vectors (sklearn `components_`), sign-fixed.
    pub components: Vec<f32>,
    /// N×K row-major projections z = (X − mean)·componentsᵀ (sklearn `transform`).
    pub projections: Vec<f32>,
    /// K variances along the components, divided by N − 1 (sklearn `explained_variance_`).
    pub explained_variance: Vec<f32>,
    /// K shares of the TOTAL variance (sklearn `explained_variance_ratio_`).
    pub explained_variance_ratio: Vec<f32>,
    /// Total variance Σ_features var (ddof = 1), the denominator of the ratios.
    pub total_variance: f64,
}

/// Which symmetric matrix [`pca`] decomposes; both give the same result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PcaRoute {
    /// D×D covariance XcᵀXc/(N−1).
    Covariance,
    /// N×N Gram matrix XcXcᵀ; loadings recovered as Xcᵀu/‖·‖.
    Gram,
}

/// PCA of the N×D row-major matrix `x`, keeping `k` components.
///
/// Matches scikit-learn's `PCA(n_components=k).fit(x)` (any exact solver):
/// * features are centred by their mean; variances divide by N − 1;
/// * `explained_variance_ratio` = λ_j / total variance (trace of the covariance), so the K
///   ratios need not sum to 1;
/// * **signs follow scikit-learn ≥ 1.5** (`svd_flip(u_based_decision=False)`): each loading
///   vector is flipped so that its largest-|·| entry (first one on exact ties) is positive, and
///   its projections flip with it.
///
/// It eigen-decomposes the smaller of the D×D covariance and the N×N Gram matrix with a
/// deterministic symmetric eigen-solver in f64 ([`symmetric_eigen`]: Householder + implicit QL).
///
/// Errors: shape mismatch, N < 2, k outside 1..=min(N, D) (named `psm.k`), non-finite values,
/// zero total variance (all patches identical) or a kept component with (numerically) zero
/// variance (feature rank < k).
pub fn pca(x: &[f32], n: usize, d: usize, k: usize) -> Result<Pca> {
    let route = if d <= n { PcaRoute::Covariance } else { PcaRoute::Gram };
    pca_with(x, n, d, k, route)
}

fn pca_with(x: &[f32], n: usize, d: usize, k: usize, route: PcaRoute) -> Result<Pca> {
    ensure!(x.len() == n * d, "psm pca: feature matrix has {} values, expected N×D = {n}×{d} = {}", x.len(), n * d);
    ensure!(n >= 2, "psm pca: need at least 2 patches (N = {n})");
    ensure!(d >= 1, "psm pca: feature width D must be at least 1");
    ensure!(k >= 1 && k <= n.min(d), "psm.k = {k} must be in 1..=min(N, D) = 1..={} (N = {n} patches, D = {d})", n.min(d));
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        bail!("psm pca: non-finite feature value {} at patch {}, channel {}", x[i], i / d, i % d);
    }

    // Centre in f64.
    let mut mean = vec![0f64; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    let xc: Vec<f64> = x.chunks_exact(d).flat_map(|row| row.iter().zip(&mean).map(|(&v, &m)| v as f64 - m)).collect();
    let denom = (n - 1) as f64;
    let total: f64 = xc.iter().map(|v| v * v).sum::<f64>() / denom;
    ensure!(total.is_finite() && total > 0.0, "psm pca: degenerate features: total variance is {total} (all {n} patches identical?)");

    // Loadings (K×D, unit rows) and variances λ_j, before the sign fix.
    let mut comps = vec![0f64; k * d];
    let mut vars = vec![0f64; k];
    match route {
        PcaRoute::Covariance => {
            let mut cov = vec![0f64; d * d];
            for row in xc.chunks_exact(d) {
                for a in 0..d {
                    let ra = row[a];
                    if ra == 0.0 {
                        continue;
                    }
                    let dst = &mut cov[a * d..(a + 1) * d];
                    for b in a..d {
                        dst[b] += ra * row[b];
                    }
                }
            }
            for a in 0..d {
                for b in a..d {
                    let v = cov[a * d + b] / denom;
                    cov[a * d + b] = v;
                    cov[b * d + a] = v;
                }
            }
            let (vals, vecs) = symmetric_eigen(&cov, d);
            for j in 0..k {
                vars[j] = vals[j];
                comps[j * d..(j + 1) * d].copy_from_slice(&vecs[j * d..(j + 1) * d]);
            }
        }
        PcaRoute::Gram => {
            let mut gram = vec![0f64; n * n];
            for a in 0..n {
                let ra = &xc[a * d..(a + 1) * d];
                for b in a..n {
                    let rb = &xc[b * d..(b + 1) * d];
                    let s: f64 = ra.iter().zip(rb).map(|(p, q)| p * q).sum();
                    gram[a * n + b] = s;
                    gram[b * n + a] = s;
                }
            }
            let (vals, vecs) = symmetric_eigen(&gram, n);
            for j in 0..k {
                vars[j] = vals[j] / denom;
                // v_j ∝ Xcᵀ u_j; renormalise explicitly rather than dividing by √μ_j so that
                // rounding in μ_j does not leak into the loading's length.
                let u = &vecs[j * n..(j + 1) * n];
                let v = &mut comps[j * d..(j + 1) * d];
                for (i, &ui) in u.iter().enumerate() {
                    if ui == 0.0 {
                        continue;
                    }
                    for (vc, &xv) in v.iter_mut().zip(&xc[i * d..(i + 1) * d]) {
                        *vc += ui * xv;
                    }
                }
                let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|a| *a /= norm);
                }
            }
        }
    }
    // A component whose variance is at rounding level has an arbitrary direction: refuse it
    // rather than return noise (the caller falls back to an all-ones map).
    for (j, &lam) in vars.iter().enumerate() {
        ensure!(
            lam > total * 1e-12,
            "psm pca: component {} of psm.k = {k} has (numerically) zero variance {lam:e} \
             (total {total:e}): the {n}×{d} features have rank < k",
            j + 1
        );
    }

    // sklearn ≥ 1.5 svd_flip(u_based_decision=False): largest-|loading| entry positive.
    for j in 0..k {
        let v = &mut comps[j * d..(j + 1) * d];
        let mut best = 0usize;
        for (i, a) in v.iter().enumerate() {
            if a.abs() > v[best].abs() {
                best = i;
            }
        }
        if v[best] < 0.0 {
            v.iter_mut().for_each(|a| *a = -*a);
        }
    }

    // Projections z = Xc·vᵀ (computed directly for both routes).
    let mut proj = vec![0f32; n * k];
    for i in 0..n {
        let row = &xc[i * d..(i + 1) * d];
        for j in 0..k {
            let v = &comps[j * d..(j + 1) * d];
            proj[i * k + j] = row.iter().zip(v).map(|(a, b)| a * b).sum::<f64>() as f32;
        }
    }
    Ok(Pca {
        n,
        d,
        k,
        mean: mean.iter().map(|&m| m as f32).collect(),
        components: comps.iter().map(|&c| c as f32).collect(),
        projections: proj,
        explained_variance: vars.iter().map(|&v| v as f32).collect(),
        explained_variance_ratio: vars.iter().map(|&v| (v / total) as f32).collect(),
        total_variance: total,
    })
}

/// Eigen-decomposition of the symmetric n×n row-major matrix `a` (only the lower triangle is
/// read) in f64: Householder reduction to tridiagonal form followed by the implicit QL algorithm
/// (EISPACK `tred2`/`tql2`, as in JAMA). Returns `(values, vectors)` with the values sorted in
/// descending order (stable: equal values keep index order) and `vectors[j*n..(j+1)*n]` the unit
/// eigenvector of `values[j]`. Deterministic: fixed operation order, no randomness.
/// (A cyclic Jacobi solver, [`symmetric_eigen_jacobi`], is ~8× slower at n = 256.)
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n, "symmetric_eigen: matrix is not n×n");
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    // tred2 on v (row-major V[i][j] = v[i*n+j]); symmetric input, so reading the lower triangle
    // is the same as JAMA's.
    let mut v = a.to_vec();
    let mut d: Vec<f64> = v[(n - 1) * n..].to_vec();
    let mut e = vec![0f64; n];
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[(i - 1) * n + j];
                v[i * n + j] = 0.0;
                v[j * n + i] = 0.0;
            }
        } else {
            for dk in d[..i].iter_mut() {
                *dk /= scale;
                h += *dk * *dk;
            }
            let f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].iter_mut().for_each(|x| *x = 0.0);
            for j in 0..i {
                let f = d[j];
                v[j * n + i] = f;
                let mut g = e[j] + v[j * n + j] * f;
                for k in j + 1..i {
                    g += v[k * n + j] * d[k];
                    e[k] += v[k * n + j] * f;
                }
                e[j] = g;
            }
            let mut f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                let (f, g) = (d[j], e[j]);
                for k in j..i {
                    v[k * n + j] -= f * e[k] + g * d[k];
                }
                d[j] = v[(i - 1) * n + j];
                v[i * n + j] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the Householder transformations.
    for i in 0..n - 1 {
        v[(n - 1) * n + i] = v[i * n + i];
        v[i * n + i] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[k * n + i + 1] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[k * n + i + 1] * v[k * n + j];
                }
                for k in 0..=i {
                    v[k * n + j] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[k * n + i + 1] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[(n - 1) * n + j];
        v[(n - 1) * n + j] = 0.0;
    }
    v[(n - 1) * n + n - 1] = 1.0;
    e[0] = 0.0;

    // tql2 on the transposed vectors, so that each rotation touches two contiguous rows.
    let mut w = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            w[i * n + k] = v[k * n + i];
        }
    }
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1 = 0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            // QL converges in 1–3 iterations per eigenvalue; the cap only guards against
            // non-finite input looping forever.
            for _ in 0..200 {
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let h = g - d[l];
                for di in d[l + 2..].iter_mut() {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0f64, 1.0f64, 1.0f64);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0f64, 0.0f64);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    let h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (lo, hi) = w.split_at_mut((i + 1) * n);
                    let wi = &mut lo[i * n..];
                    let wi1 = &mut hi[..n];
                    for (a, b) in wi.iter_mut().zip(wi1.iter_mut()) {
                        let hb = *b;
                        *b = s * *a + c * hb;
                        *a = c * *a - s * hb;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    // w holds eigenvectors as rows; sort_eigen expects columns.
    sort_eigen(d, v_from_rows(&w, n), n)
}

/// Transposes a row-major n×n matrix (rows → columns).
fn v_from_rows(w: &[f64], n: usize) -> Vec<f64> {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            v[k * n + i] = w[i * n + k];
        }
    }
    v
}

/// Same contract as [`symmetric_eigen`], by cyclic Jacobi rotations (Numerical Recipes `jacobi`
/// with thresholds) in f64. Slower (≈ 8× at n = 256) but very accurate: kept as an independent
/// cross-check of the QL solver.
pub fn symmetric_eigen_jacobi(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n, "symmetric_eigen_jacobi: matrix is not n×n");
    let mut m = a.to_vec();
    // v holds eigenvectors as columns during the iteration.
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let mut dg: Vec<f64> = (0..n).map(|i| m[i * n + i]).collect();
    // b/z: accumulate diagonal updates per sweep for accuracy (Numerical Recipes `jacobi`).
    let mut b = dg.clone();
    let mut z = vec![0f64; n];
    let scale: f64 = {
        let s: f64 = (0..n).flat_map(|i| (i..n).map(move |j| (i, j))).map(|(i, j)| m[i * n + j] * m[i * n + j] * if i == j { 1.0 } else { 2.0 }).sum();
        s.sqrt()
    };
    if scale == 0.0 || n < 2 {
        return sort_eigen(dg, v, n);
    }
    // Off-diagonal entries below this are at the matrix's own rounding level: treat as zero.
    let negligible = scale * 1e-17;
    for sweep in 1..=100 {
        let off: f64 = (0..n).flat_map(|p| ((p + 1)..n).map(move |q| (p, q))).map(|(p, q)| m[p * n + q].abs()).sum();
        if off <= negligible {
            break;
        }
        // Early sweeps only rotate the larger elements (cheaper convergence).
        let tresh = if sweep < 4 { 0.2 * off / (n * n) as f64 } else { 0.0 };
        for p in 0..n - 1 {
            for q in p + 1..n {
                let apq = m[p * n + q];
                let g = 100.0 * apq.abs();
                if sweep > 4 && ((dg[p].abs() + g == dg[p].abs() && dg[q].abs() + g == dg[q].abs()) || apq.abs() <= negligible) {
                    m[p * n + q] = 0.0;
                    continue;
                }
                if apq.abs() <= tresh || apq == 0.0 {
                    continue;
                }
                let h = dg[q] - dg[p];
                let t = if h.abs() + g == h.abs() {
                    apq / h
                } else {
                    let theta = 0.5 * h / apq;
                    let t = 1.0 / (theta.abs() + (1.0 + theta * theta).sqrt());
                    if theta < 0.0 {
                        -t
                    } else {
                        t
                    }
                };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = t * c;
                let tau = s / (1.0 + c);
                let hh = t * apq;
                z[p] -= hh;
                z[q] += hh;
                dg[p] -= hh;
                dg[q] += hh;
                m[p * n + q] = 0.0;
                let rot = |m: &mut [f64], i: usize, j: usize| {
                    let g = m[i];
                    let h = m[j];
                    m[i] = g - s * (h + g * tau);
                    m[j] = h + s * (g - h * tau);
                };
                for j in 0..p {
                    rot(&mut m, j * n + p, j * n + q);
                }
                for j in p + 1..q {
                    rot(&mut m, p * n + j, j * n + q);
                }
                for j in q + 1..n {
                    rot(&mut m, p * n + j, q * n + j);
                }
                for j in 0..n {
                    rot(&mut v, j * n + p, j * n + q);
                }
            }
        }
        for i in 0..n {
            b[i] += z[i];
            dg[i] = b[i];
            z[i] = 0.0;
        }
    }
    sort_eigen(dg, v, n)
}

/// Sorts eigenpairs descending; `v` has eigenvectors as columns, the result as rows.
fn sort_eigen(vals: Vec<f64>, v: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
    let sorted_vals = order.iter().map(|&i| vals[i]).collect();
    let mut rows = vec![0f64; n * n];
    for (r, &col) in order.iter().enumerate() {
        for i in 0..n {
            rows[r * n + i] = v[i * n + col];
        }
    }
    (sorted_vals, rows)
}

/// Remaps one component's projections as the released code does:
/// z' = (max z − z)/(max z − min z), so the most negative projection maps to 1.
/// A constant component (max = min) has no spatial information and maps to all zeros
/// (what the released code's `+eps` denominator yields), so it adds nothing to a weighted sum.
pub fn remap_component(z: &[f32]) -> Vec<f32> {
    let (lo, hi) = z.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v as f64), hi.max(v as f64)));
    let range = hi - lo;
    if range.is_nan() || range <= 0.0 || range.is_infinite() {
        return vec![0.0; z.len()];
    }
    z.iter().map(|&v| ((hi - v as f64) / range) as f32).collect()
}

/// Combines N×K remapped components (row-major) into N values, clipped to [0,1].
/// `ratios` are the K explained-variance ratios (used only by [`Aggregation::Weighted`]; they
/// are NOT renormalised to sum to 1, as in the released code).
pub fn aggregate(remapped: &[f32], n: usize, k: usize, ratios: &[f32], how: Aggregation) -> Vec<f32> {
    assert_eq!(remapped.len(), n * k, "aggregate: remapped is not N×K");
    assert_eq!(ratios.len(), k, "aggregate: ratios is not K long");
    (0..n)
        .map(|i| {
            let row = &remapped[i * k..(i + 1) * k];
            let s: f64 = match how {
                Aggregation::Weighted => row.iter().zip(ratios).map(|(&z, &l)| z as f64 * l as f64).sum(),
                Aggregation::Average => row.iter().map(|&z| z as f64).sum::<f64>() / k as f64,
                Aggregation::First => row[0] as f64,
            };
            s.clamp(0.0, 1.0) as f32
        })
        .collect()
}

/// Min–max normalises `v` in place to [0,1]: the minimum becomes exactly 0 and the maximum
/// exactly 1. A constant input (or one whose range is not finite) becomes **all ones**: a map
/// with no spatial preference is the uniform weight M = 1 (plain pixel-level GRPO, the same as
/// the extraction-failure fallback), which keeps the advantage's size instead of zeroing it.
pub fn min_max(v: &mut [f32]) {
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x as f64), hi.max(x as f64)));
    let range = hi - lo;
    if range.is_nan() || range <= 0.0 || range.is_infinite() {
        v.iter_mut().for_each(|x| *x = 1.0);
        return;
    }
    for x in v.iter_mut() {
        // (x − lo)/range is exactly 0 at the minimum and exactly 1 at the maximum.
        *x = ((*x as f64 - lo) / range).clamp(0.0, 1.0) as f32;
    }
}

/// Normalised 1-D Gaussian kernel exactly as SciPy builds it: radius = ⌊4σ + 0.5⌋,
/// w_i ∝ exp(−i²/(2σ²)) for i ∈ −radius..=radius, summing to 1.
pub fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as usize;
    let w: Vec<f64> = (-(radius as i64)..=radius as i64).map(|i| (-0.5 * (i * i) as f64 / (sigma * sigma)).exp()).collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|x| x / s).collect()
}

/// SciPy 'reflect' (half-sample symmetric) index: `d c b a | a b c d | d c b a`, periodic with
/// period 2n, so it is valid for any offset.
fn reflect_index(i: i64, n: usize) -> usize {
    let n2 = 2 * n as i64;
    let m = i.rem_euclid(n2);
    if m >= n as i64 {
        (n2 - 1 - m) as usize
    } else {
        m as usize
    }
}

/// 1-D correlation of `len` values at `base + t*stride` with a symmetric kernel, 'reflect'.
fn smooth_line(data: &mut [f64], base: usize, stride: usize, len: usize, kernel: &[f64], buf: &mut Vec<f64>) {
    let r = (kernel.len() / 2) as i64;
    buf.clear();
    buf.extend((0..len).map(|t| data[base + t * stride]));
    for t in 0..len {
        let mut s = 0.0;
        for (ki, &w) in kernel.iter().enumerate() {
            s += w * buf[reflect_index(t as i64 + ki as i64 - r, len)];
        }
        data[base + t * stride] = s;
    }
}

/// Gaussian smoothing of an h×w row-major grid like
/// `scipy.ndimage.gaussian_filter(grid, sigma, mode='reflect', truncate=4.0)`: separable,
/// first along rows (axis 0) then columns (axis 1), kernel from [`gaussian_kernel`], boundary
/// 'reflect' (`d c b a | a b c d | d c b a`, repeated when the kernel is wider than the grid).
/// Accumulates in f64 (SciPy keeps f32 between the two passes: differences are at f32 rounding).
/// σ = 0 (or any σ that is not a positive finite number) returns the grid unchanged.
pub fn gaussian_smooth_2d(grid: &[f32], h: usize, w: usize, sigma: f64) -> Vec<f32> {
    assert_eq!(grid.len(), h * w, "gaussian_smooth_2d: grid is not h×w");
    if sigma.is_nan() || sigma <= 0.0 || sigma.is_infinite() || h == 0 || w == 0 {
        return grid.to_vec();
    }
    let kernel = gaussian_kernel(sigma);
    let mut data: Vec<f64> = grid.iter().map(|&v| v as f64).collect();
    let mut buf = Vec::new();
    for x in 0..w {
        smooth_line(&mut data, x, w, h, &kernel, &mut buf);
    }
    for y in 0..h {
        smooth_line(&mut data, y * w, 1, w, &kernel, &mut buf);
    }
    data.into_iter().map(|v| v as f32).collect()
}

/// Per-output-index (first input index, normalised weights) of PyTorch's antialiased bilinear
/// resampling along one axis (`_compute_weights_aa`, align_corners=False): scale = in/out,
/// support = max(scale, 1), triangle filter evaluated at (j − center + 0.5)/max(scale, 1).
fn aa_weights(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..out_size)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // `as i64` truncates toward zero, like the C++ static_cast.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|j| {
                    let x = ((j as f64 - center + 0.5) * invscale).abs();
                    if x < 1.0 {
                        1.0 - x
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, w)
        })
        .collect()
}

/// Resizes an h×w row-major grid to out_h×out_w like
/// `torch.nn.functional.interpolate(x, size=(out_h, out_w), mode='bilinear',
/// align_corners=False, antialias=True)`: a separable PIL-style triangle filter whose support
/// widens by the scale factor when downsampling (an area-weighted average), and which is exactly
/// plain bilinear (edge-clamped) when upsampling. Weights and sums in f64.
/// An empty source gives an all-zero output.
pub fn resize_bilinear_antialias(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    assert_eq!(src.len(), h * w, "resize_bilinear_antialias: src is not h×w");
    if h == 0 || w == 0 {
        return vec![0.0; out_h * out_w];
    }
    let wx = aa_weights(w, out_w);
    let wy = aa_weights(h, out_h);
    // Horizontal pass: h × out_w.
    let mut tmp = vec![0f64; h * out_w];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for (ox, (x0, ws)) in wx.iter().enumerate() {
            tmp[y * out_w + ox] = ws.iter().enumerate().map(|(j, &c)| c * row[x0 + j] as f64).sum();
        }
    }
    // Vertical pass.
    let mut out = vec![0f32; out_h * out_w];
    for (oy, (y0, ws)) in wy.iter().enumerate() {
        for ox in 0..out_w {
            let s: f64 = ws.iter().enumerate().map(|(j, &c)| c * tmp[(y0 + j) * out_w + ox]).sum();
            out[oy * out_w + ox] = s as f32;
        }
    }
    out
}

/// Every intermediate of [`allocation_map`], so `vipo map` can dump them and an independent
/// implementation can check each stage.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MapStages {
    /// N×K (row-major) PCA projections z_j.
    pub projections: Vec<f32>,
    /// K×D loadings (sign-fixed, sklearn ≥ 1.5).
    pub components: Vec<f32>,
    /// K explained-variance ratios λ_j (share of the total variance, like sklearn).
    pub explained_variance_ratio: Vec<f32>,
    /// N×K remapped components z'_j = (max z_j − z_j)/(max z_j − min z_j).
    pub remapped: Vec<f32>,
    /// N aggregated values, clipped to [0,1].
    pub aggregated: Vec<f32>,
    /// h×w grid after Gaussian smoothing and min–max.
    pub smoothed: Vec<f32>,
    /// out_h×out_w final map, exactly in [0,1] (min 0 and max 1 unless constant → all ones).
    pub map: Vec<f32>,
    /// Patch grid (h, w).
    pub grid: (usize, usize),
    /// Output grid (out_h, out_w).
    pub out: (usize, usize),
}

/// Allocation map of one image from its patch features (docs/DESIGN.md §1.3 steps 2–6); see the
/// module docs for the stages. Errors (named fields, never panics) on a malformed feature map,
/// an invalid config, non-finite features or degenerate variance.
pub fn allocation_map(feat: &FeatureMap, out_h: usize, out_w: usize, cfg: &PsmConfig) -> Result<MapStages> {
    let (h, w, d) = (feat.h, feat.w, feat.d);
    let n = h * w;
    ensure!(n >= 1 && d >= 1, "psm: empty feature map ({h}×{w}×{d})");
    ensure!(feat.data.len() == n * d, "psm: feature map data has {} values, expected h×w×d = {h}×{w}×{d} = {}", feat.data.len(), n * d);
    ensure!(out_h >= 1 && out_w >= 1, "psm: output map size {out_h}×{out_w} is empty");
    cfg.validate(d)?;
    ensure!(cfg.k <= n, "psm.k = {} exceeds the number of patches N = {n} ({h}×{w})", cfg.k);
    let k = cfg.k;
    let p = pca(&feat.data, n, d, k)?;

    let mut remapped = vec![0f32; n * k];
    for j in 0..k {
        let z: Vec<f32> = (0..n).map(|i| p.projections[i * k + j]).collect();
        let mut r = remap_component(&z);
        if should_flip(&r, h, w, cfg.orient) {
            // Remapping −z gives exactly 1 − z'.
            r.iter_mut().for_each(|v| *v = 1.0 - *v);
        }
        for (i, v) in r.into_iter().enumerate() {
            remapped[i * k + j] = v;
        }
    }
    let aggregated = aggregate(&remapped, n, k, &p.explained_variance_ratio, cfg.aggregation);
    let mut smoothed = gaussian_smooth_2d(&aggregated, h, w, cfg.sigma);
    min_max(&mut smoothed);
    let mut map = resize_bilinear_antialias(&smoothed, h, w, out_h, out_w);
    min_max(&mut map);
    Ok(MapStages { projections: p.projections, components: p.components, explained_variance_ratio: p.explained_variance_ratio, remapped, aggregated, smoothed, map, grid: (h, w), out: (out_h, out_w) })
}

/// Like [`allocation_maps`], but also returns `(sample index, error message)` for every sample
/// that fell back to the all-ones map, so the caller can log why.
pub fn allocation_maps_with_errors(feats: &[FeatureMap], out_h: usize, out_w: usize, cfg: &PsmConfig) -> (Vec<Vec<f32>>, Vec<(usize, String)>) {
    use rayon::prelude::*;
    let results: Vec<Result<Vec<f32>>> = feats.par_iter().map(|f| allocation_map(f, out_h, out_w, cfg).map(|s| s.map)).collect();
    let mut errors = Vec::new();
    let maps = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            Ok(m) => m,
            Err(e) => {
                errors.push((i, format!("{e:#}")));
                vec![1.0; out_h * out_w]
            }
        })
        .collect();
    (maps, errors)
}

/// Batch helper used by the trainer: one out_h×out_w map per feature map. A sample whose
/// extraction fails (non-finite features, degenerate variance, bad shape, …) gets an all-ones
/// map (M = 1, plain GRPO for that sample) and is counted in the second value, never silently;
/// use [`allocation_maps_with_errors`] to get the reasons.
pub fn allocation_maps(feats: &[FeatureMap], out_h: usize, out_w: usize, cfg: &PsmConfig) -> (Vec<Vec<f32>>, usize) {
    let (maps, errors) = allocation_maps_with_errors(feats, out_h, out_w, cfg);
    (maps, errors.len())
}

/// Share of map mass on object pixels, Σ_p M(p)·obj(p) / Σ_p M(p), and the object area fraction
/// (mean of `object_mask`). A map with zero total mass gives NaN for the share (undefined).
/// Panics if the two slices differ in length (both come from the same grid in code).
pub fn map_object_mass(map: &[f32], object_mask: &[f32]) -> (f32, f32) {
    assert_eq!(map.len(), object_mask.len(), "map_object_mass: map and mask differ in length");
    if map.is_empty() {
        return (f32::NAN, f32::NAN);
    }
    let total: f64 = map.iter().map(|&m| m as f64).sum();
    let on_obj: f64 = map.iter().zip(object_mask).map(|(&m, &o)| m as f64 * o as f64).sum();
    let area = object_mask.iter().map(|&o| o as f64).sum::<f64>() / map.len() as f64;
    let share = if total != 0.0 { on_obj / total } else { f64::NAN };
    (share as f32, area as f32)
}

/// Video (docs/DESIGN.md §1.3 step 7): per-frame maps (`frames.len()` = F, each h×w) → out_t×h×w
/// volume (row-major, time outermost).
///
/// 1. Resample along time like `torch.nn.functional.interpolate(mode='trilinear',
///    align_corners=False)` with the spatial size unchanged (so spatially the identity): source
///    t = (F/out_t)·(τ + 0.5) − 0.5 clamped at 0, linear between the two neighbouring frames
///    (the upper index clamped at F − 1). Not antialiased, like torch's trilinear.
/// 2. A 1-D Gaussian along time with σ_t frames (0 = off), SciPy conventions as in
///    [`gaussian_smooth_2d`] (radius ⌊4σ_t + 0.5⌋, 'reflect'); for σ_t = 0.3 the kernel has 3 taps.
/// 3. Min–max ([`min_max`]) over the whole volume, or per frame when `per_frame_norm`.
///
/// An empty `frames` (or out_t = 0) gives an all-ones out_t×h×w volume. Panics if a frame is not
/// h×w (frames come from [`allocation_map`], never from the user).
pub fn temporal_map(frames: &[Vec<f32>], h: usize, w: usize, out_t: usize, temporal_sigma: f64, per_frame_norm: bool) -> Vec<f32> {
    let hw = h * w;
    if frames.is_empty() || out_t == 0 || hw == 0 {
        return vec![1.0; out_t * hw];
    }
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.len(), hw, "temporal_map: frame {i} has {} values, expected {h}×{w}", f.len());
    }
    let nf = frames.len();
    let mut vol = vec![0f64; out_t * hw];
    if nf == out_t {
        // torch short-cuts equal sizes to a copy.
        for (t, f) in frames.iter().enumerate() {
            for (dst, &v) in vol[t * hw..(t + 1) * hw].iter_mut().zip(f) {
                *dst = v as f64;
            }
        }
    } else {
        let scale = nf as f64 / out_t as f64;
        for t in 0..out_t {
            let src = (scale * (t as f64 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(nf - 1);
            let i1 = if i0 < nf - 1 { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f64).clamp(0.0, 1.0);
            let l0 = 1.0 - l1;
            let (f0, f1) = (&frames[i0], &frames[i1]);
            for p in 0..hw {
                vol[t * hw + p] = l0 * f0[p] as f64 + l1 * f1[p] as f64;
            }
        }
    }
    if temporal_sigma > 0.0 && temporal_sigma.is_finite() && out_t > 1 {
        let kernel = gaussian_kernel(temporal_sigma);
        let mut buf = Vec::new();
        for p in 0..hw {
            smooth_line(&mut vol, p, hw, out_t, &kernel, &mut buf);
        }
    }
    let mut out: Vec<f32> = vol.into_iter().map(|v| v as f32).collect();
    if per_frame_norm {
        for f in out.chunks_exact_mut(hw) {
            min_max(f);
        }
    } else {
        min_max(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }
    fn assert_all_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(close(g as f64, w, tol), "index {i}: got {g}, want {w}\n got {got:?}\n want {want:?}");
        }
    }

    /// 4 centred points on orthogonal Hadamard columns, scaled 3, 2, 1: variances 12, 16/3, 4/3
    /// along the coordinate axes; then rotated by the rows of `r` and shifted by a mean.
    fn constructed(extra_zero_cols: usize) -> (Vec<f32>, usize) {
        let cols = [[3.0, 3.0, -3.0, -3.0], [2.0, -2.0, 2.0, -2.0], [1.0, -1.0, -1.0, 1.0]];
        // Rows of an orthonormal R: x' = x·R, so the principal directions are these rows.
        let r = [[0.6, -0.8, 0.0], [0.0, 0.0, -1.0], [0.8, 0.6, 0.0]];
        let d = 3 + extra_zero_cols;
        let mean = [5.0, -1.0, 2.0];
        let mut x = vec![0f32; 4 * d];
        for i in 0..4 {
            for c in 0..3 {
                let v: f64 = (0..3).map(|j| cols[j][i] * r[j][c]).sum();
                x[i * d + c] = (v + mean[c]) as f32;
            }
            for c in 3..d {
                x[i * d + c] = 7.0; // constant features: no variance
            }
        }
        (x, d)
    }

    fn check_constructed(p: &Pca, d: usize) {
        // Ratios: 12 : 16/3 : 4/3 over total 56/3 → 9/14, 2/7, 1/14.
        assert_all_close(&p.explained_variance, &[12.0, 16.0 / 3.0, 4.0 / 3.0], 1e-4);
        assert_all_close(&p.explained_variance_ratio, &[9.0 / 14.0, 2.0 / 7.0, 1.0 / 14.0], 1e-6);
        assert!(close(p.total_variance, 56.0 / 3.0, 1e-5)); // inputs are f32
                                                            // sklearn ≥ 1.5 signs: (0.6, −0.8, 0) flips (largest |.| is −0.8), (0, 0, −1) flips,
                                                            // (0.8, 0.6, 0) stays.
        let mut want = vec![0f64; 3 * d];
        want[..3].copy_from_slice(&[-0.6, 0.8, 0.0]);
        want[d..d + 3].copy_from_slice(&[0.0, 0.0, 1.0]);
        want[2 * d..2 * d + 3].copy_from_slice(&[0.8, 0.6, 0.0]);
        assert_all_close(&p.components, &want, 1e-6);
        // Projections: the Hadamard columns times the flip signs (−, −, +), N×K row-major.
        let want_proj: Vec<f64> = (0..4)
            .flat_map(|i| {
                let c = [[3.0, 3.0, -3.0, -3.0], [2.0, -2.0, 2.0, -2.0], [1.0, -1.0, -1.0, 1.0]];
                vec![-c[0][i], -c[1][i], c[2][i]]
            })
            .collect();
        assert_all_close(&p.projections, &want_proj, 1e-5);
        let mut want_mean = vec![7.0; d];
        want_mean[..3].copy_from_slice(&[5.0, -1.0, 2.0]);
        assert_all_close(&p.mean, &want_mean, 1e-6);
    }

    #[test]
    fn pca_known_directions_covariance_route() {
        let (x, d) = constructed(0);
        let p = pca(&x, 4, d, 3).unwrap();
        check_constructed(&p, d);
    }

    #[test]
    fn pca_known_directions_gram_route() {
        // D = 6 > N = 4 → Gram route; three constant columns carry no variance.
        let (x, d) = constructed(3);
        assert!(d > 4);
        let p = pca(&x, 4, d, 3).unwrap();
        check_constructed(&p, d);
    }

    #[test]
    fn pca_routes_agree_on_random_features() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, d, k) = (12, 9, 4);
        let x: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let a = pca_with(&x, n, d, k, PcaRoute::Covariance).unwrap();
        let b = pca_with(&x, n, d, k, PcaRoute::Gram).unwrap();
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_all_close(&a.components, &f(&b.components), 1e-5);
        assert_all_close(&a.projections, &f(&b.projections), 1e-5);
        assert_all_close(&a.explained_variance_ratio, &f(&b.explained_variance_ratio), 1e-6);
        // Ratios descending, sum ≤ 1; loadings unit and orthogonal; sign convention holds.
        let r = &a.explained_variance_ratio;
        assert!(r.windows(2).all(|w| w[0] >= w[1]) && r.iter().sum::<f32>() <= 1.0 + 1e-6);
        for j in 0..k {
            let vj = &a.components[j * d..(j + 1) * d];
            let big = vj.iter().cloned().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            assert!(big > 0.0, "largest loading of component {j} must be positive");
            for l in 0..k {
                let vl = &a.components[l * d..(l + 1) * d];
                let dot: f32 = vj.iter().zip(vl).map(|(p, q)| p * q).sum();
                assert!(close(dot as f64, if j == l { 1.0 } else { 0.0 }, 1e-5));
            }
        }
    }

    #[test]
    fn pca_errors_on_bad_input() {
        let (x, d) = constructed(0);
        assert!(format!("{}", pca(&x, 4, d, 0).unwrap_err()).contains("psm.k"));
        assert!(format!("{}", pca(&x, 4, d, 4).unwrap_err()).contains("psm.k"));
        // Rank 3 after centring with N = 4: a fourth component does not exist even with D = 6.
        let (x6, d6) = constructed(3);
        assert!(format!("{}", pca(&x6, 4, d6, 4).unwrap_err()).contains("zero variance"));
        assert!(pca(&x[..5], 4, d, 1).is_err());
        let mut bad = x.clone();
        bad[3] = f32::NAN;
        assert!(format!("{}", pca(&bad, 4, d, 1).unwrap_err()).contains("non-finite"));
        assert!(format!("{}", pca(&[1.5; 12], 4, 3, 1).unwrap_err()).contains("degenerate"));
    }

    #[test]
    fn symmetric_eigen_reconstructs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 20;
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                let v = rng.gen_range(-1.0..1.0);
                a[i * n + j] = v;
                a[j * n + i] = v;
            }
        }
        let (vals, vecs) = symmetric_eigen(&a, n);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        for j in 0..n {
            let v = &vecs[j * n..(j + 1) * n];
            for i in 0..n {
                let av: f64 = (0..n).map(|c| a[i * n + c] * v[c]).sum();
                assert!(close(av, vals[j] * v[i], 1e-10), "A v = λ v fails for pair {j}");
            }
            for l in 0..n {
                let dot: f64 = v.iter().zip(&vecs[l * n..(l + 1) * n]).map(|(p, q)| p * q).sum();
                assert!(close(dot, if j == l { 1.0 } else { 0.0 }, 1e-10));
            }
        }
        // The Jacobi solver agrees (eigenvectors up to sign; the spectrum is simple here).
        let (jv, jvec) = symmetric_eigen_jacobi(&a, n);
        for j in 0..n {
            assert!(close(jv[j], vals[j], 1e-10));
            let dot: f64 = (0..n).map(|i| jvec[j * n + i] * vecs[j * n + i]).sum();
            assert!(close(dot.abs(), 1.0, 1e-9), "eigenvector {j} differs: |dot| = {dot}");
        }
        // Rank-deficient PSD input (a centred Gram matrix has a zero eigenvalue).
        let x: Vec<f64> = (0..n * 3).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let g: Vec<f64> = (0..n * n).map(|ij| (0..3).map(|c| x[(ij / n) * 3 + c] * x[(ij % n) * 3 + c]).sum()).collect();
        let (gv, gvec) = symmetric_eigen(&g, n);
        assert!(gv[3..].iter().all(|&l| l.abs() < 1e-12) && gv[2] > 1e-3);
        for j in 0..3 {
            for i in 0..n {
                let gvj: f64 = (0..n).map(|c| g[i * n + c] * gvec[j * n + c]).sum();
                assert!(close(gvj, gv[j] * gvec[j * n + i], 1e-10));
            }
        }
        // Diagonal input: eigenvalues are the diagonal, sorted.
        let diag = [1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 2.0];
        let (vals, vecs) = symmetric_eigen(&diag, 3);
        assert_eq!(vals, vec![3.0, 2.0, 1.0]);
        assert_eq!(vecs[..3].iter().map(|x| x.abs()).collect::<Vec<_>>(), vec![0.0, 1.0, 0.0]);
        assert_eq!(symmetric_eigen(&[5.0], 1), (vec![5.0], vec![1.0]));
        assert_eq!(symmetric_eigen_jacobi(&diag, 3).0, vec![3.0, 2.0, 1.0]);
    }

    #[test]
    fn remap_and_constant_component() {
        assert_all_close(&remap_component(&[1.0, -1.0, 3.0]), &[0.5, 1.0, 0.0], 0.0);
        assert_eq!(remap_component(&[2.0, 2.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn each_aggregation() {
        // 3 patches × K = 2.
        let rem = [1.0, 0.0, 0.5, 1.0, 0.0, 0.25];
        let ratios = [0.6, 0.3];
        assert_all_close(&aggregate(&rem, 3, 2, &ratios, Aggregation::Weighted), &[0.6, 0.3 + 0.3, 0.075], 1e-7);
        assert_all_close(&aggregate(&rem, 3, 2, &ratios, Aggregation::Average), &[0.5, 0.75, 0.125], 1e-7);
        assert_all_close(&aggregate(&rem, 3, 2, &ratios, Aggregation::First), &[1.0, 0.5, 0.0], 0.0);
        // Clipping to [0,1] (weights above 1 cannot happen with ratios, but the clip is the spec).
        assert_all_close(&aggregate(&[1.0, 1.0], 1, 2, &[0.9, 0.8], Aggregation::Weighted), &[1.0], 0.0);
    }

    #[test]
    fn min_max_exact_and_constant() {
        let mut v = vec![2.0, 4.0, 3.0];
        min_max(&mut v);
        assert_eq!(v, vec![0.0, 1.0, 0.5]);
        let mut c = vec![0.3; 4];
        min_max(&mut c);
        assert_eq!(c, vec![1.0; 4]);
    }

    #[test]
    fn gaussian_kernel_matches_scipy_recipe() {
        let k = gaussian_kernel(1.0);
        assert_eq!(k.len(), 9); // radius ⌊4.5⌋ = 4
        let z: f64 = (-4..=4).map(|i: i32| (-0.5 * (i * i) as f64).exp()).sum();
        assert!(close(k[4], 1.0 / z, 1e-15) && close(k[5], (-0.5f64).exp() / z, 1e-15));
        assert_eq!(gaussian_kernel(0.3).len(), 3); // radius ⌊1.7⌋ = 1
    }

    #[test]
    fn smoothing_delta_interior_and_reflect_boundary() {
        let g = gaussian_kernel(1.0); // taps −4..=4
                                      // Interior delta on 9×9: output = outer product of the kernel.
        let mut grid = vec![0f32; 81];
        grid[4 * 9 + 4] = 1.0;
        let out = gaussian_smooth_2d(&grid, 9, 9, 1.0);
        let want: Vec<f64> = (0..81).map(|i| g[i / 9] * g[i % 9]).collect();
        assert_all_close(&out, &want, 1e-7);
        // Corner delta on 5×6: 'reflect' folds tap −i and −i−1 onto index 0, so along one axis
        // out[i] = g(i) + g(i+1) (kernel symmetric; g(t) = 0 beyond radius 4).
        let gt = |t: usize| if t <= 4 { g[4 + t] } else { 0.0 };
        let mut grid = vec![0f32; 30];
        grid[0] = 1.0;
        let out = gaussian_smooth_2d(&grid, 5, 6, 1.0);
        let want: Vec<f64> = (0..30).map(|i| (gt(i / 6) + gt(i / 6 + 1)) * (gt(i % 6) + gt(i % 6 + 1))).collect();
        assert_all_close(&out, &want, 1e-7);
        // σ = 0 is the identity; a constant grid stays constant.
        assert_eq!(gaussian_smooth_2d(&grid, 5, 6, 0.0), grid);
        assert_all_close(&gaussian_smooth_2d(&[0.7; 6], 2, 3, 2.0), &[0.7; 6], 1e-6);
    }

    #[test]
    fn smoothing_kernel_wider_than_grid_reflects_repeatedly() {
        // σ = 0.5 → radius 2, taps w(t) ∝ exp(−2t²), on a 1×2 grid [1, 0].
        // Extended signal (reflect, period 4): idx −2→1, −1→0, 0→0, 1→1, 2→1, 3→0.
        let e = |t: f64| (-2.0 * t * t).exp();
        let z = e(0.0) + 2.0 * e(1.0) + 2.0 * e(2.0);
        let out = gaussian_smooth_2d(&[1.0, 0.0], 1, 2, 0.5);
        // out[0] = w(−1) + w(0); out[1] = w(−2) + w(−1) + w(2).
        assert_all_close(&out, &[(e(1.0) + e(0.0)) / z, (2.0 * e(2.0) + e(1.0)) / z], 1e-7);
    }

    #[test]
    fn resize_upsample_2x2_to_4x4_torch_values() {
        let out = resize_bilinear_antialias(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
        #[rustfmt::skip]
        let want = [0.0, 0.25, 0.75, 1.0,
                    0.5, 0.75, 1.25, 1.5,
                    1.5, 1.75, 2.25, 2.5,
                    2.0, 2.25, 2.75, 3.0];
        assert_all_close(&out, &want, 1e-6);
    }

    #[test]
    fn resize_downsample_antialiased_torch_values() {
        // 1×4 → 1×2: weights [3,3,1,0]/7 and [0,1,3,3]/7 (triangle of half-width 2).
        assert_all_close(&resize_bilinear_antialias(&[0.0, 1.0, 2.0, 3.0], 1, 4, 1, 2), &[5.0 / 7.0, 16.0 / 7.0], 1e-6);
        // 4×4 arange → 2×2: 4·E_y + E_x with E ∈ {5/7, 16/7}.
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let out = resize_bilinear_antialias(&src, 4, 4, 2, 2);
        assert_all_close(&out, &[25.0 / 7.0, 36.0 / 7.0, 69.0 / 7.0, 80.0 / 7.0], 1e-5);
        // Integer factor 2 of a constant stays constant; same size is the identity.
        assert_all_close(&resize_bilinear_antialias(&[0.4; 16], 4, 4, 2, 2), &[0.4; 4], 1e-6);
        assert_eq!(resize_bilinear_antialias(&src, 4, 4, 4, 4), src);
    }

    #[test]
    fn resize_upsample_is_plain_bilinear() {
        // 3 → 5 along x: src = 0.6·(i + 0.5) − 0.5 clamped to [0, 2].
        let src = [1.0f32, 4.0, -2.0];
        let out = resize_bilinear_antialias(&src, 1, 3, 1, 5);
        let want: Vec<f64> = (0..5)
            .map(|i| {
                let s = (0.6 * (i as f64 + 0.5) - 0.5).max(0.0);
                let i0 = s.floor() as usize;
                let i1 = (i0 + 1).min(2);
                let l = s - i0 as f64;
                (1.0 - l) * src[i0] as f64 + l * src[i1] as f64
            })
            .collect();
        assert_all_close(&out, &want, 1e-6);
    }

    fn two_region_features(h: usize, w: usize, d: usize, seed: u64) -> (FeatureMap, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut data = vec![0f32; h * w * d];
        let mut mask = vec![0f32; h * w];
        for y in 0..h {
            for x in 0..w {
                let obj = y >= h / 4 && y < 3 * h / 4 && x >= w / 4 && x < 3 * w / 4;
                mask[y * w + x] = obj as u8 as f32;
                for c in 0..d {
                    let base = if obj { (c as f32 * 0.37).sin() } else { (c as f32 * 0.11).cos() };
                    data[(y * w + x) * d + c] = base + 0.05 * rng.gen_range(-1.0f32..1.0);
                }
            }
        }
        (FeatureMap { h, w, d, data }, mask)
    }

    #[test]
    fn allocation_map_stages_consistent_and_exact_range() {
        let (feat, mask) = two_region_features(8, 8, 16, 1);
        for agg in [Aggregation::Weighted, Aggregation::Average, Aggregation::First] {
            let cfg = PsmConfig { k: 3, aggregation: agg, sigma: 1.0, orient: Orient::Sklearn };
            let s = allocation_map(&feat, 16, 16, &cfg).unwrap();
            assert_eq!((s.projections.len(), s.components.len(), s.remapped.len()), (64 * 3, 3 * 16, 64 * 3));
            assert_eq!((s.aggregated.len(), s.smoothed.len(), s.map.len()), (64, 64, 256));
            let mn = s.map.iter().cloned().fold(f32::INFINITY, f32::min);
            let mx = s.map.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!((mn, mx), (0.0, 1.0));
            // Each stage is exactly the documented function of the previous one.
            let mut sm = gaussian_smooth_2d(&s.aggregated, 8, 8, 1.0);
            min_max(&mut sm);
            assert_eq!(sm, s.smoothed);
            let mut m = resize_bilinear_antialias(&s.smoothed, 8, 8, 16, 16);
            min_max(&mut m);
            assert_eq!(m, s.map);
            // The dominant component separates the two regions: the map is not uniform across
            // them (which region wins depends on the fixed sign convention).
            let (share, area) = map_object_mass(&s.map, &resize_bilinear_antialias(&mask, 8, 8, 16, 16));
            assert!(close(area as f64, 0.25, 1e-6));
            assert!((share as f64 - area as f64).abs() > 0.05, "{agg:?}: share {share}");
        }
        // First component alone, no smoothing: first-component remap is exactly 2-valued-ish.
        let cfg = PsmConfig { k: 1, aggregation: Aggregation::First, sigma: 0.0, orient: Orient::Sklearn };
        let s = allocation_map(&feat, 8, 8, &cfg).unwrap();
        let obj: Vec<f32> = s.map.iter().zip(&mask).filter(|p| *p.1 > 0.5).map(|p| *p.0).collect();
        let bg: Vec<f32> = s.map.iter().zip(&mask).filter(|p| *p.1 < 0.5).map(|p| *p.0).collect();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&obj) - mean(&bg)).abs() > 0.8);
    }

    #[test]
    fn fallbacks_are_counted() {
        let (good, _) = two_region_features(6, 6, 8, 2);
        let mut nan = good.clone();
        nan.data[5] = f32::NAN;
        let constant = FeatureMap { h: 6, w: 6, d: 8, data: vec![0.5; 6 * 6 * 8] };
        let tiny = FeatureMap { h: 1, w: 2, d: 8, data: good.data[..16].to_vec() }; // k = 3 > N = 2
        let short = FeatureMap { h: 6, w: 6, d: 8, data: vec![0.0; 10] };
        let cfg = PsmConfig::default();
        let feats = vec![good.clone(), nan, constant, tiny, short, good];
        let (maps, fallbacks) = allocation_maps(&feats, 4, 5, &cfg);
        assert_eq!(fallbacks, 4);
        assert_eq!(maps.len(), 6);
        for (i, m) in maps.iter().enumerate().take(5).skip(1) {
            assert_eq!(*m, vec![1.0; 20], "sample {i} falls back to ones");
        }
        assert!(maps[0].contains(&0.0) && maps[0] == maps[5]);
        let (_, errs) = allocation_maps_with_errors(&feats, 4, 5, &cfg);
        let idx: Vec<usize> = errs.iter().map(|e| e.0).collect();
        assert_eq!(idx, vec![1, 2, 3, 4]);
        assert!(errs[2].1.contains("psm.k"));
    }

    #[test]
    fn config_validation_and_serde() {
        assert!(PsmConfig::default().validate(8).is_ok());
        let e = PsmConfig { k: 0, ..Default::default() }.validate(8).unwrap_err();
        assert!(e.to_string().contains("psm.k"));
        assert!(PsmConfig { k: 9, ..Default::default() }.validate(8).unwrap_err().to_string().contains("psm.k"));
        let e = PsmConfig { sigma: -1.0, ..Default::default() }.validate(8).unwrap_err();
        assert!(e.to_string().contains("psm.sigma"));
        let c: PsmConfig = toml::from_str("aggregation = \"average\"\nk = 2").unwrap();
        assert_eq!(c, PsmConfig { k: 2, aggregation: Aggregation::Average, sigma: 1.0, orient: Orient::Minority });
        assert!(toml::from_str::<PsmConfig>("aggregation = \"median\"").is_err());
        assert!(toml::from_str::<PsmConfig>("sigmaa = 1.0").is_err());
    }

    #[test]
    fn object_mass() {
        let (share, area) = map_object_mass(&[1.0, 0.5, 0.0, 0.5], &[1.0, 1.0, 0.0, 0.0]);
        assert!(close(share as f64, 0.75, 1e-7) && close(area as f64, 0.5, 1e-7));
        assert!(map_object_mass(&[0.0, 0.0], &[1.0, 0.0]).0.is_nan());
    }

    #[test]
    fn temporal_resample_upsample_and_downsample() {
        // 2 frames of 1×2 → 4: src t = 0.5(τ+0.5) − 0.5 → 0 (clamped), 0.25, 0.75, 1.25 → frame 1.
        let frames = vec![vec![0.0, 1.0], vec![1.0, 0.0]];
        let out = temporal_map(&frames, 1, 2, 4, 0.0, false);
        assert_all_close(&out, &[0.0, 1.0, 0.25, 0.75, 0.75, 0.25, 1.0, 0.0], 1e-7);
        // 4 frames → 2: src t = 0.5 and 2.5 → midpoints; then min–max over the volume.
        let frames: Vec<Vec<f32>> = (0..4).map(|t| vec![t as f32, 0.0]).collect();
        let out = temporal_map(&frames, 1, 2, 2, 0.0, false);
        assert_all_close(&out, &[0.5 / 2.5, 0.0, 1.0, 0.0], 1e-7);
        // Per-frame normalisation: each frame independently to [0,1].
        let out = temporal_map(&frames, 1, 2, 2, 0.0, true);
        assert_all_close(&out, &[1.0, 0.0, 1.0, 0.0], 0.0);
        // Empty input → all ones.
        assert_eq!(temporal_map(&[], 1, 2, 3, 0.3, false), vec![1.0; 6]);
    }

    #[test]
    fn temporal_gaussian_against_hand_kernel() {
        // 3 frames (same length out), σ_t = 0.5: radius 2, w(t) ∝ exp(−2t²); a delta in frame 0
        // of pixel 0, pixel 1 constant 0.5 (stays 0.5 before normalisation).
        let e = |t: f64| (-2.0 * t * t).exp();
        let z = e(0.0) + 2.0 * e(1.0) + 2.0 * e(2.0);
        let frames = vec![vec![1.0, 0.5], vec![0.0, 0.5], vec![0.0, 0.5]];
        // Reflect on 3 frames, delta at 0: idx −2→1, −1→0, 0→0, 1→1, 2→2, 3→2, 4→1.
        // out[0] = w(−1)+w(0); out[1] = w(−2)+w(−1); out[2] = w(−2).
        let p0 = [(e(1.0) + e(0.0)) / z, (e(2.0) + e(1.0)) / z, e(2.0) / z];
        let raw = [p0[0], 0.5, p0[1], 0.5, p0[2], 0.5];
        let lo = raw.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = raw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let want: Vec<f64> = raw.iter().map(|v| (v - lo) / (hi - lo)).collect();
        assert_all_close(&temporal_map(&frames, 1, 2, 3, 0.5, false), &want, 1e-6);
        // σ_t = 0.3 (the default): 3 taps exp(−t²/0.18).
        let a = (-1.0f64 / 0.18).exp();
        let frames = vec![vec![0.0f32], vec![1.0], vec![0.0], vec![0.0]];
        let raw = [a / (1.0 + 2.0 * a), 1.0 / (1.0 + 2.0 * a), a / (1.0 + 2.0 * a), 0.0];
        let want: Vec<f64> = raw.iter().map(|v| v / raw[1]).collect();
        assert_all_close(&temporal_map(&frames, 1, 1, 4, 0.3, false), &want, 1e-6);
    }

    /// Timing probe (run with `--ignored --nocapture`): PCA for N = 196, D = 96 and
    /// N = 256, D = 1280, and a full map.
    #[test]
    #[ignore]
    fn timing_probe() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (n, d) in [(196usize, 96usize), (256, 384), (256, 1280)] {
            let x: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let t = std::time::Instant::now();
            let reps = 5;
            for _ in 0..reps {
                pca(&x, n, d, 3).unwrap();
            }
            eprintln!("pca N={n} D={d}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
        }
    }
}

#[cfg(test)]
mod orient_tests {
    use super::*;

    /// Two clusters of patches: a small "object" (4 patches) and a large background.
    /// With `minority`, the map is high on the object whatever sign the PCA returned.
    #[test]
    fn minority_orientation_puts_the_small_cluster_high() {
        let (h, w, d) = (4usize, 4usize, 3usize);
        for flip in [1f32, -1.0] {
            let mut data = Vec::new();
            for i in 0..h * w {
                let obj = i == 5 || i == 6 || i == 9 || i == 10;
                let base = if obj { [3.0 * flip, 0.0, 1.0] } else { [0.0, 0.0, 1.0] };
                data.extend(base.iter().enumerate().map(|(c, v)| v + 0.01 * ((i * 7 + c * 3) % 5) as f32));
            }
            let feat = FeatureMap { h, w, d, data };
            let cfg = PsmConfig { k: 1, aggregation: Aggregation::First, sigma: 0.0, orient: Orient::Minority };
            let s = allocation_map(&feat, h, w, &cfg).unwrap();
            for i in [5, 6, 9, 10] {
                assert!(s.map[i] > 0.9, "flip {flip}: object patch {i} = {}", s.map[i]);
            }
            assert!(s.map[0] < 0.1, "flip {flip}: background = {}", s.map[0]);
        }
        let c: PsmConfig = toml::from_str("orient = \"minority\"").unwrap();
        assert_eq!(c.orient, Orient::Minority);
    }

    /// Features of a structured random image: a blob of "object" patches (its own feature
    /// offset) on a noisy ground, so the PCA has a clear but sign-arbitrary first direction.
    fn blob_features(h: usize, w: usize, d: usize, seed: u64) -> FeatureMap {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let dir: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let dir2: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let (cy, cx) = (rng.gen_range(3..h - 3) as f32, rng.gen_range(3..w - 3) as f32);
        let mut data = Vec::with_capacity(h * w * d);
        for y in 0..h {
            for x in 0..w {
                let r2 = (y as f32 - cy).powi(2) + (x as f32 - cx).powi(2);
                let obj = (-r2 / 4.0).exp();
                let ramp = x as f32 / w as f32; // a background gradient: a second component
                for c in 0..d {
                    data.push(3.0 * obj * dir[c] + 0.8 * ramp * dir2[c] + 0.3 * rng.gen_range(-1.0..1.0f32));
                }
            }
        }
        FeatureMap { h, w, d, data }
    }

    /// Reflect every feature vector across the hyperplane normal to `u` (F → F(I − 2uuᵀ)):
    /// flips the sign of the feature direction u, which is what an arbitrary PCA sign does.
    fn reflect(f: &FeatureMap, u: &[f32]) -> FeatureMap {
        let norm = u.iter().map(|v| v * v).sum::<f32>().sqrt();
        let u: Vec<f32> = u.iter().map(|v| v / norm).collect();
        let mut data = f.data.clone();
        for row in data.chunks_mut(f.d) {
            let dot: f32 = row.iter().zip(&u).map(|(a, b)| a * b).sum();
            row.iter_mut().zip(&u).for_each(|(a, b)| *a -= 2.0 * dot * b);
        }
        FeatureMap { data, ..f.clone() }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The default (`border`) map is the same whatever sign any feature direction has: for
    /// flips of single coordinates (among them each component's largest loading, which
    /// decides scikit-learn's sign) and of random directions. `sklearn` is not invariant
    /// (shown on the same features, so the check has teeth).
    #[test]
    fn border_orientation_is_invariant_to_feature_sign_flips() {
        let (h, w, d) = (12usize, 12usize, 16usize);
        let mut sklearn_changed = false;
        for seed in 0..4 {
            let f = blob_features(h, w, d, seed);
            for orient in [Orient::Border, Orient::Minority] {
                let cfg = PsmConfig { orient, ..Default::default() };
                let base = allocation_map(&f, 24, 24, &cfg).unwrap();
                let mut dirs: Vec<Vec<f32>> = (0..d).map(|i| (0..d).map(|j| (i == j) as u8 as f32).collect()).collect();
                use rand::{Rng, SeedableRng};
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(100 + seed);
                dirs.extend((0..4).map(|_| (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect()));
                for u in &dirs {
                    let m = allocation_map(&reflect(&f, u), 24, 24, &cfg).unwrap();
                    let diff = max_diff(&base.map, &m.map);
                    assert!(diff < 1e-3, "seed {seed} {orient:?}: a sign flip changed the map by {diff}");
                }
            }
            let cfg = PsmConfig { orient: Orient::Sklearn, ..Default::default() };
            let base = allocation_map(&f, 24, 24, &cfg).unwrap();
            let k0 = (0..d).max_by(|&a, &b| base.components[a].abs().total_cmp(&base.components[b].abs())).unwrap();
            let u: Vec<f32> = (0..d).map(|j| (j == k0) as u8 as f32).collect();
            sklearn_changed |= max_diff(&base.map, &allocation_map(&reflect(&f, &u), 24, 24, &cfg).unwrap().map) > 0.1;
        }
        assert!(sklearn_changed, "flipping the largest loading should change the sklearn-oriented map");
    }

    /// With border orientation the component that separates the blob from the ground is
    /// high on the blob, whichever sign the PCA gave it.
    #[test]
    fn border_orientation_puts_a_framed_blob_high() {
        for seed in 0..4 {
            let f = blob_features(12, 12, 16, seed);
            let cfg = PsmConfig { k: 1, aggregation: Aggregation::First, sigma: 0.0, orient: Orient::Border };
            let s = allocation_map(&f, 12, 12, &cfg).unwrap();
            let ring: f32 = (0..12).map(|i| s.map[i] + s.map[132 + i] + s.map[i * 12] + s.map[i * 12 + 11]).sum::<f32>() / 48.0;
            let peak = (0..144).max_by(|&a, &b| s.map[a].total_cmp(&s.map[b])).unwrap();
            let (py, px) = (peak / 12, peak % 12);
            assert!(ring < 0.5 && (1..11).contains(&py) && (1..11).contains(&px), "seed {seed}: ring mean {ring}, peak at ({py}, {px})");
        }
    }

    fn render_one(color: crate::world::Color, shape: crate::world::Shape, cx: f32, cy: f32, size: f32) -> (crate::image::Image, Vec<f32>) {
        use crate::world::{Group, Object, PromptSpec, Scene};
        let spec = PromptSpec { groups: vec![Group { count: 1, color, shape }], relation: None };
        let scene = Scene { spec, objects: vec![Object { color, shape, cx, cy, size, group: 0 }] };
        let r = crate::world::render(&scene, 32);
        (r.image, r.masks[0].clone())
    }

    /// The default backbone and PSM on constructed images — one object on the plain ground,
    /// in every colour and shape, at several places and sizes: the map's peak lies on the
    /// object (all but one of 24 cases, see below).
    #[test]
    fn one_object_on_a_plain_ground_gets_the_peak() {
        use crate::world::{Color, Shape};
        let bb = crate::backbone::load(&Default::default()).unwrap();
        let places = [(0.5, 0.5, 0.13), (0.3, 0.7, 0.09), (0.75, 0.25, 0.13), (0.2, 0.2, 0.09)];
        let mut cases = Vec::new();
        for (i, &c) in Color::ALL.iter().enumerate() {
            for (j, &sh) in [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond].iter().enumerate() {
                let (cx, cy, size) = places[(i + j) % places.len()];
                cases.push((c, sh, render_one(c, sh, cx, cy, size)));
            }
        }
        let images: Vec<_> = cases.iter().map(|(_, _, (im, _))| im.clone()).collect();
        let feats = bb.features(&images).unwrap();
        let cfg = PsmConfig::default();
        let mut off = Vec::new();
        for ((c, sh, (_, mask)), f) in cases.iter().zip(&feats) {
            let s = allocation_map(f, 32, 32, &cfg).unwrap();
            let peak = (0..1024).max_by(|&a, &b| s.map[a].total_cmp(&s.map[b])).unwrap();
            // The peak pixel, or one of its 8 neighbours (the map is smooth at patch scale),
            // is covered by the object.
            let (py, px) = ((peak / 32) as i64, (peak % 32) as i64);
            let near =
                (-1..=1).flat_map(|dy| (-1..=1).map(move |dx| (py + dy, px + dx))).filter(|&(y, x)| (0..32).contains(&y) && (0..32).contains(&x)).any(|(y, x)| mask[(y * 32 + x) as usize] > 0.5);
            if !near {
                off.push(format!("{c:?} {sh:?}: map peak at ({py}, {px})"));
            }
        }
        eprintln!("one-object peaks off the object: {} of {}: {off:?}", off.len(), cases.len());
        // Measured: 24 of 24 with the default context padding (without it, 23: the small
        // red diamond near the corner peaked off it, on the frame the zero padding makes).
        assert!(off.is_empty(), "{off:?}");
    }

    /// Map mass on renders with known masks: on ground-truth ShapeWorld scenes the default
    /// map puts over twice its area share on the objects, and more than the released-code
    /// orientation does.
    #[test]
    fn map_mass_on_renders_is_on_the_objects() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let prompts = crate::world::prompts(crate::world::Split::Eval, 24, 5);
        let mut images = Vec::new();
        let mut masks = Vec::new();
        for p in &prompts {
            let r = crate::world::render(&crate::world::sample_scene(p, &mut rng), 32);
            let mut m = vec![0f32; 1024];
            for om in &r.masks {
                m.iter_mut().zip(om).for_each(|(a, b)| *a = a.max(*b));
            }
            images.push(r.image);
            masks.push(m);
        }
        let feats = crate::backbone::load(&Default::default()).unwrap().features(&images).unwrap();
        let ratio = |orient| {
            let (maps, fails) = allocation_maps(&feats, 32, 32, &PsmConfig { orient, ..Default::default() });
            assert_eq!(fails, 0);
            let (mut mass, mut area) = (0.0, 0.0);
            for (m, o) in maps.iter().zip(&masks) {
                let (a, b) = map_object_mass(m, o);
                mass += a as f64;
                area += b as f64;
            }
            mass / area
        };
        let (default, border, sklearn) = (ratio(PsmConfig::default().orient), ratio(Orient::Border), ratio(Orient::Sklearn));
        eprintln!("object mass / area on renders: default (minority) {default:.2}, border {border:.2}, sklearn {sklearn:.2}");
        // Measured on these 24 renders with the default features.6 @ 112 and context padding:
        // 3.38 (border 2.93, sklearn 2.36; without padding 2.56 / 2.26 / 1.86; bench/NOTES.md
        // §5.1 has the 32-render bench and the samples). The bound leaves room for float
        // differences between CPUs; both content rules must beat the released-code orientation.
        assert!(default >= 3.1, "default: object mass only {default:.2}× the area share");
        assert!(default > sklearn && border > sklearn, "minority {default:.2} / border {border:.2} vs sklearn {sklearn:.2}");
    }
}
