//! The streaming merge: `W' = W + scale · B·A` for every adapted projection,
//! one tensor at a time, in f32, from memory-mapped safetensors.
//!
//! [`MergedModel`] is a view over a base model and an optional adapter: it
//! lists the output tensors and computes each merged tensor on demand, so a
//! writer (safetensors shards, `.bin`, GGUF) streams the model while holding
//! one tensor plus the adapter in memory.

use crate::adapter::{Adapter, LoraModule};
use crate::dtype::{self, DType};
use crate::error::{MergeError, Result};
use crate::gemm::{View, add_product};
use crate::st::{SafetensorsSet, TensorSpec};
use std::borrow::Cow;
use std::collections::HashMap;

/// A base model with an adapter folded in, computed tensor by tensor.
#[derive(Debug)]
pub struct MergedModel<'a> {
    /// The base weights.
    pub base: &'a SafetensorsSet,
    /// The adapter, if any (None = plain conversion).
    pub adapter: Option<&'a Adapter>,
    weight_mods: HashMap<String, Vec<usize>>,
    bias_mods: HashMap<String, usize>,
    /// Replacement tensors the base does not have (e.g. an untied `lm_head.weight`).
    extra: Vec<String>,
}

fn shape_err(module: &str, what: String) -> MergeError {
    MergeError::unsupported(
        format!("adapter module `{module}` does not fit the base model: {what}"),
        "the adapter was trained on a different base model (or a resized vocabulary); pass the base it was trained on",
    )
}

impl<'a> MergedModel<'a> {
    /// Checks that the adapter fits the base (every target exists, shapes agree) and builds the view.
    pub fn new(base: &'a SafetensorsSet, adapter: Option<&'a Adapter>) -> Result<Self> {
        let mut weight_mods: HashMap<String, Vec<usize>> = HashMap::new();
        let mut bias_mods = HashMap::new();
        let mut extra = Vec::new();
        if let Some(ad) = adapter {
            for (i, m) in ad.modules.iter().enumerate() {
                let w = base.get(&m.base_weight).ok_or_else(|| {
                    shape_err(
                        &m.module,
                        format!("the base has no tensor `{}`", m.base_weight),
                    )
                })?;
                let a = ad
                    .tensors
                    .get(&m.a)
                    .map(|e| e.shape.clone())
                    .unwrap_or_default();
                let b = ad
                    .tensors
                    .get(&m.b)
                    .map(|e| e.shape.clone())
                    .unwrap_or_default();
                let ok = if m.embedding {
                    // A [r, vocab], B [hidden, r], W [vocab, hidden]
                    w.shape.len() == 2 && a[1] == w.shape[0] && b[0] == w.shape[1]
                } else {
                    w.shape.len() == 2 && a[1] == w.shape[1] && b[0] == w.shape[0]
                };
                if !ok {
                    return Err(shape_err(
                        &m.module,
                        format!("base {:?}, lora_A {a:?}, lora_B {b:?}", w.shape),
                    ));
                }
                if let Some(mag) = &m.magnitude {
                    if m.embedding {
                        return Err(MergeError::unsupported(
                            format!("DoRA on the embedding `{}` is not supported", m.module),
                            "train DoRA on linear projections only, or plain LoRA on embeddings",
                        ));
                    }
                    let n = ad.tensors.get(mag).map(|e| e.numel()).unwrap_or(0);
                    if n != w.shape[0] {
                        return Err(shape_err(
                            &m.module,
                            format!(
                                "DoRA magnitude has {n} entries, base has {} rows",
                                w.shape[0]
                            ),
                        ));
                    }
                }
                if let Some(bias) = &m.bias {
                    let bname = format!("{}.bias", m.module);
                    if base.get(&bname).is_none() {
                        return Err(shape_err(
                            &m.module,
                            format!("lora_B.bias `{bias}` but the base has no `{bname}`"),
                        ));
                    }
                    bias_mods.insert(bname, i);
                }
                weight_mods
                    .entry(m.base_weight.clone())
                    .or_default()
                    .push(i);
            }
            for (base_name, ad_name) in &ad.replacements {
                let shape = ad
                    .tensors
                    .get(ad_name)
                    .map(|e| e.shape.clone())
                    .unwrap_or_default();
                match base.get(base_name) {
                    Some(e) if e.shape != shape => {
                        return Err(shape_err(
                            base_name,
                            format!("saved module has shape {shape:?}, base has {:?}", e.shape),
                        ));
                    }
                    Some(_) => {}
                    None => extra.push(base_name.clone()),
                }
            }
        }
        Ok(Self {
            base,
            adapter,
            weight_mods,
            bias_mods,
            extra,
        })
    }

    /// Whether a tensor differs from the base (adapted, replaced or added).
    pub fn is_modified(&self, name: &str) -> bool {
        self.weight_mods.contains_key(name)
            || self.bias_mods.contains_key(name)
            || self
                .adapter
                .is_some_and(|a| a.replacements.contains_key(name))
    }

    /// Tensors the base lacks that the adapter adds (an `lm_head.weight` saved for a tied model).
    pub fn added(&self) -> &[String] {
        &self.extra
    }

    /// The output tensors in order (base file order, then added ones), each in
    /// `out_dtype` or, when None, in its source dtype.
    pub fn specs(&self, out_dtype: Option<DType>) -> Vec<TensorSpec> {
        let mut v: Vec<TensorSpec> = self
            .base
            .entries()
            .iter()
            .map(|e| TensorSpec {
                name: e.name.clone(),
                dtype: out_dtype.unwrap_or(e.dtype),
                shape: e.shape.clone(),
            })
            .collect();
        if let Some(ad) = self.adapter {
            for name in &self.extra {
                if let Some(e) = ad.replacements.get(name).and_then(|n| ad.tensors.get(n)) {
                    v.push(TensorSpec {
                        name: name.clone(),
                        dtype: out_dtype.unwrap_or(e.dtype),
                        shape: e.shape.clone(),
                    });
                }
            }
        }
        v
    }

    /// Shape and source dtype of an output tensor.
    pub fn shape_of(&self, name: &str) -> Option<(Vec<usize>, DType)> {
        if let Some(e) = self.base.get(name) {
            return Some((e.shape.clone(), e.dtype));
        }
        let ad = self.adapter?;
        ad.replacements
            .get(name)
            .and_then(|n| ad.tensors.get(n))
            .map(|e| (e.shape.clone(), e.dtype))
    }

    /// The merged values of a tensor, in f32.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        if let Some(ad) = self.adapter
            && let Some(src) = ad.replacements.get(name)
        {
            return Ok(ad.f32(src)?.0);
        }
        let e = self.base.get(name).ok_or_else(|| MergeError::NotFound {
            message: format!("tensor `{name}` is not in the model"),
            file: None,
            hint: None,
        })?;
        let mut w = self.base.f32(e);
        let Some(ad) = self.adapter else { return Ok(w) };
        if let Some(mods) = self.weight_mods.get(name) {
            for &i in mods {
                apply_module(&mut w, &e.shape, ad, &ad.modules[i])?;
            }
        }
        if let Some(&i) = self.bias_mods.get(name) {
            let m = &ad.modules[i];
            if let Some(b) = &m.bias {
                let (bias, _) = ad.f32(b)?;
                for (x, d) in w.iter_mut().zip(&bias) {
                    *x += m.scale as f32 * d;
                }
            }
        }
        Ok(w)
    }

    /// The bytes of a tensor in `dtype`: the base bytes themselves when the tensor is
    /// unmodified and already in `dtype`, else merged in f32 and converted.
    pub fn bytes(&self, name: &str, dtype: DType) -> Result<Cow<'a, [u8]>> {
        if !self.is_modified(name)
            && let Some(e) = self.base.get(name)
            && e.dtype == dtype
        {
            return Ok(Cow::Borrowed(self.base.bytes(e)));
        }
        Ok(Cow::Owned(dtype::from_f32(&self.values(name)?, dtype)))
    }
}

/// The delta `scale · B·A` of one module, as a dense row-major tensor of the base shape.
pub fn module_delta(shape: &[usize], ad: &Adapter, m: &LoraModule) -> Result<Vec<f32>> {
    let mut d = vec![0f32; shape.iter().product()];
    add_delta(&mut d, shape, ad, m, 1.0)?;
    Ok(d)
}

fn add_delta(
    w: &mut [f32],
    shape: &[usize],
    ad: &Adapter,
    m: &LoraModule,
    factor: f32,
) -> Result<()> {
    let (a, ash) = ad.f32(&m.a)?;
    let (b, bsh) = ad.f32(&m.b)?;
    let r = m.rank;
    let s = (m.scale as f32) * factor;
    if m.embedding {
        // W [vocab, hidden] += s · (B[hidden, r] · A[r, vocab])ᵀ = s · Aᵀ · Bᵀ
        let av = View::row_major(&a, ash[0], ash[1]).t();
        let bv = View::row_major(&b, bsh[0], bsh[1]).t();
        add_product(w, s, av, bv)
    } else {
        let (out, inn) = (shape[0], shape[1]);
        add_product(
            w,
            s,
            View::row_major(&b, out, r),
            View::row_major(&a, r, inn),
        )
    }
}

fn apply_module(w: &mut [f32], shape: &[usize], ad: &Adapter, m: &LoraModule) -> Result<()> {
    add_delta(w, shape, ad, m, 1.0)?;
    if let Some(mag) = &m.magnitude {
        // DoRA: W' = m · (W + sBA) / ‖W + sBA‖ (L2 norm of each output row).
        let (mag, _) = ad.f32(mag)?;
        let cols = shape[1];
        for (row, g) in w.chunks_exact_mut(cols).zip(&mag) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            let f = if norm > 0.0 { g / norm } else { 0.0 };
            row.iter_mut().for_each(|x| *x *= f);
        }
    }
    Ok(())
}
