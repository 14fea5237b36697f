//! The model's building blocks: [`Linear`] (with an optional LoRA adapter),
//! [`RmsNorm`] and [`Embedding`]. Base weights are plain tensors outside
//! autograd; trainable parameters live only in LoRA adapters.

use crate::lora::LoraLayer;
use tch::Tensor;

/// A linear projection `y = x Wᵀ (+ b)`, plus `lora(x)` when an adapter is attached.
#[derive(Debug)]
pub struct Linear {
    /// Frozen weight `[out_features, in_features]`.
    pub weight: Tensor,
    /// Frozen bias `[out_features]`.
    pub bias: Option<Tensor>,
    /// The LoRA adapter, when one is attached.
    pub lora: Option<LoraLayer>,
}

impl Linear {
    /// A projection without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// Input width.
    pub fn in_features(&self) -> i64 {
        self.weight.size().get(1).copied().unwrap_or(0)
    }

    /// Output width.
    pub fn out_features(&self) -> i64 {
        self.weight.size().first().copied().unwrap_or(0)
    }

    /// Forward in evaluation mode.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }

    /// Forward; `train` enables the adapter's dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.lora {
            Some(l) => l.add_to(y, x, train),
            None => y,
        }
    }
}

/// Root-mean-square layer norm: `w · x / sqrt(mean(x²) + eps)`, computed in fp32.
#[derive(Debug)]
pub struct RmsNorm {
    /// Scale `[hidden]`.
    pub weight: Tensor,
    /// Epsilon.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(tch::Kind::Float);
        let var = h.square().mean_dim(&[-1i64][..], true, tch::Kind::Float);
        let normed = (h * (var + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}

/// A token embedding table `[vocab, hidden]`.
#[derive(Debug)]
pub struct Embedding {
    /// The table.
    pub weight: Tensor,
}

impl Embedding {
    /// Looks up `ids` (any shape) → `[..., hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}
