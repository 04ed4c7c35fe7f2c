//! The conditioning a policy computes from prompts, in its own form: a sequence (token ids
//! for the embedded ShapeWorld policies; text-encoder hidden states for SD3.5 / FLUX) and
//! an optional pooled vector (CLIP's pooled embedding for SD3.5 / FLUX). Samplers and the
//! trainer only batch it (select rows, stack with the null condition for CFG); what it
//! means is the policy's business.

use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct Condition {
    /// (B, L) token ids or (B, L, D) hidden states.
    pub seq: Tensor,
    /// (B, D) pooled embedding, when the policy uses one.
    pub pooled: Option<Tensor>,
}

impl Condition {
    /// A sequence-only condition (the ShapeWorld policies' token ids).
    pub fn tokens(seq: Tensor) -> Self {
        Self { seq, pooled: None }
    }

    /// Batch size.
    pub fn rows(&self) -> Result<usize> {
        self.seq.dim(0)
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self { seq: f(&self.seq)?, pooled: self.pooled.as_ref().map(&f).transpose()? })
    }

    /// Rows `idx` (u32, (n,)) of the batch, in that order.
    pub fn index_select(&self, idx: &Tensor) -> Result<Self> {
        self.map(|t| t.index_select(idx, 0))
    }

    pub fn narrow(&self, start: usize, n: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, start, n))
    }

    /// Every row repeated `n` times in place (a group of `n` samples per prompt).
    pub fn repeat_rows(&self, n: usize) -> Result<Self> {
        let b = self.rows()?;
        let idx: Vec<u32> = (0..b as u32).flat_map(|i| std::iter::repeat_n(i, n)).collect();
        self.index_select(&Tensor::from_vec(idx, b * n, self.seq.device())?)
    }

    /// Batches stacked along rows (all with or all without a pooled part).
    pub fn cat(parts: &[&Condition]) -> Result<Self> {
        let seq = Tensor::cat(&parts.iter().map(|c| &c.seq).collect::<Vec<_>>(), 0)?;
        let pooled = match parts.iter().map(|c| c.pooled.as_ref()).collect::<Option<Vec<_>>>() {
            Some(p) => Some(Tensor::cat(&p, 0)?),
            None if parts.iter().all(|c| c.pooled.is_none()) => None,
            None => candle_core::bail!("Condition::cat: some parts have a pooled embedding and some do not"),
        };
        Ok(Self { seq, pooled })
    }

    /// Every part zeroed (for token ids: all padding, the ShapeWorld null prompt).
    pub fn zeros_like(&self) -> Result<Self> {
        self.map(|t| t.zeros_like())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn batch_ops_keep_parts_aligned() {
        let d = Device::Cpu;
        let c = Condition { seq: Tensor::arange(0u32, 6, &d).unwrap().reshape((3, 2)).unwrap(), pooled: Some(Tensor::new(&[[1f32], [2.], [3.]], &d).unwrap()) };
        let r = c.repeat_rows(2).unwrap();
        assert_eq!(r.seq.to_vec2::<u32>().unwrap(), vec![vec![0, 1], vec![0, 1], vec![2, 3], vec![2, 3], vec![4, 5], vec![4, 5]]);
        assert_eq!(r.pooled.as_ref().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1., 1., 2., 2., 3., 3.]);
        let n = c.narrow(1, 2).unwrap();
        let both = Condition::cat(&[&n, &n.zeros_like().unwrap()]).unwrap();
        assert_eq!(both.seq.to_vec2::<u32>().unwrap(), vec![vec![2, 3], vec![4, 5], vec![0, 0], vec![0, 0]]);
        assert_eq!(both.pooled.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![2., 3., 0., 0.]);
        assert!(Condition::cat(&[&c, &Condition::tokens(c.seq.clone())]).is_err());
    }
}
