//! ggml block quantizers (Q8_0, Q5_0, Q4_K, Q6_K) following the reference
//! routines of ggml's `ggml-quants.c` (`quantize_row_*_ref`, `make_qkx2_quants`,
//! `make_qx_quants`), which is what `llama-quantize` runs without an imatrix, plus
//! the matching dequantizers. Block layouts are ggml's `ggml-common.h`.

use half::{bf16, f16};

/// Elements of a k-quant super-block.
pub const QK_K: usize = 256;
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest, ties to even, via the 1.5·2²³ trick.
#[inline]
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0f32;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline]
fn fp16(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

#[inline]
fn fp16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

#[inline]
fn read_f16(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// f32 → little-endian f16.
pub fn to_f16(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| fp16(*v)).collect()
}

/// f32 → little-endian bf16 (round to nearest even).
pub fn to_bf16(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
        .collect()
}

/// f32 → little-endian f32.
pub fn to_f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Q8_0: blocks of 32 as `f16 d; i8 q[32]`, `d = amax/127`, `q = round(x/d)`.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&fp16(d));
        out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Q5_0: blocks of 32 as `f16 d; u8 qh[4]; u8 qs[16]`, `d = max/-16`.
pub fn quantize_q5_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 22);
    for b in x.chunks_exact(32) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&fp16(d));
        let mut qh = 0u32;
        let mut qs = [0u8; 16];
        for j in 0..16 {
            let x0 = b[j] * id;
            let x1 = b[16 + j] * id;
            let xi0 = ((x0 + 16.5) as i8 as u8).min(31);
            let xi1 = ((x1 + 16.5) as i8 as u8).min(31);
            qs[j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
            qh |= (((xi0 & 0x10) >> 4) as u32) << j;
            qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
        }
        out.extend_from_slice(&qh.to_le_bytes());
        out.extend_from_slice(&qs);
    }
    out
}

#[allow(clippy::too_many_arguments)] // mirrors the reference routine's parameters
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l_out: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_mad += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let dd = sum_w * sum_l2 - sum_l * sum_l;
        if dd > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += weights[i] * (diff * diff);
            }
            if mad < best_mad {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K: super-blocks of 256 as `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]`.
pub fn quantize_q4_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 144);
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    for xb in x.chunks_exact(QK_K) {
        let mut mins = [0f32; 8];
        let mut scales = [0f32; 8];
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..8 {
            let xs = &xb[32 * j..32 * j + 32];
            let sum_x2: f32 = xs.iter().fold(0.0, |s, v| s + v * v);
            let av_x = (sum_x2 / 32.0).sqrt();
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
            let (s, m) = make_qkx2_quants(
                xs,
                &weights,
                15,
                &mut l[32 * j..32 * j + 32],
                &mut laux,
                -1.0,
                0.1,
                20,
            );
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut sc = [0u8; 12];
        for j in 0..8 {
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                sc[j] = ls;
                sc[j + 4] = lm;
            } else {
                sc[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
                sc[j - 4] |= (ls >> 4) << 6;
                sc[j] |= (lm >> 4) << 6;
            }
        }
        let d = fp16_round(max_scale / 63.0);
        let dmin = fp16_round(max_min / 63.0);
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, &sc);
            let dd = d * s as f32;
            if dd == 0.0 {
                continue;
            }
            let dm = dmin * m as f32;
            for ii in 0..32 {
                l[32 * j + ii] = nearest_int((xb[32 * j + ii] + dm) / dd).clamp(0, 15) as u8;
            }
        }
        out.extend_from_slice(&fp16(max_scale / 63.0));
        out.extend_from_slice(&fp16(max_min / 63.0));
        out.extend_from_slice(&sc);
        for c in 0..4 {
            for k in 0..32 {
                out.push(l[64 * c + k] | (l[64 * c + 32 + k] << 4));
            }
        }
    }
    out
}

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn make_qx_quants_rmse1(x: &[f32], nmax: i32) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for &v in x {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
        let w = v * v;
        sumlx += w * v * l;
        suml2 += w * l * l;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K: super-blocks of 256 as `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`.
pub fn quantize_q6_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 210);
    for xb in x.chunks_exact(QK_K) {
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs) = (0f32, 0f32);
        for ib in 0..16 {
            let s = make_qx_quants_rmse1(&xb[16 * ib..16 * ib + 16], 32);
            scales[ib] = s;
            if s.abs() > max_abs {
                max_abs = s.abs();
                max_scale = s;
            }
        }
        if max_abs < GROUP_MAX_EPS {
            out.extend_from_slice(&[0u8; 210]);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d16 = fp16(1.0 / iscale);
        let d = read_f16(&d16);
        let mut sc = [0i8; 16];
        for ib in 0..16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        let mut l = [0u8; QK_K];
        for j in 0..16 {
            let dd = d * sc[j] as f32;
            if dd == 0.0 {
                // The reference leaves these entries as make_qx_quants set them; with a zero
                // scale they dequantise to 0 whatever they are, so 32 (= 0) is equivalent.
                l[16 * j..16 * j + 16].iter_mut().for_each(|v| *v = 32);
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(xb[16 * j + ii] / dd).clamp(-32, 31) + 32) as u8;
            }
        }
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for half in 0..2 {
            let (j, o, h) = (128 * half, 64 * half, 32 * half);
            for k in 0..32 {
                let q1 = l[j + k] & 0xf;
                let q2 = l[j + k + 32] & 0xf;
                let q3 = l[j + k + 64] & 0xf;
                let q4 = l[j + k + 96] & 0xf;
                ql[o + k] = q1 | (q3 << 4);
                ql[o + k + 32] = q2 | (q4 << 4);
                qh[h + k] = (l[j + k] >> 4)
                    | ((l[j + k + 32] >> 4) << 2)
                    | ((l[j + k + 64] >> 4) << 4)
                    | ((l[j + k + 96] >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&d16);
    }
    out
}

/// Dequantizes Q8_0 blocks.
pub fn dequantize_q8_0(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(34)
        .flat_map(|blk| {
            let d = read_f16(&blk[..2]);
            blk[2..].iter().map(move |&q| q as i8 as f32 * d)
        })
        .collect()
}

/// Dequantizes Q5_0 blocks.
pub fn dequantize_q5_0(b: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(b.len() / 22 * 32);
    for blk in b.chunks_exact(22) {
        let d = read_f16(&blk[..2]);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let qs = &blk[6..];
        let mut y = [0f32; 32];
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            y[j] = (((qs[j] & 0x0f) | h0) as i32 - 16) as f32 * d;
            y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
        }
        out.extend_from_slice(&y);
    }
    out
}

/// Dequantizes Q4_K super-blocks.
pub fn dequantize_q4_k(b: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(b.len() / 144 * QK_K);
    for blk in b.chunks_exact(144) {
        let d = read_f16(&blk[0..2]);
        let dmin = read_f16(&blk[2..4]);
        let sc = &blk[4..16];
        let q = &blk[16..];
        for c in 0..4 {
            let (s1, m1) = scale_min_k4(2 * c, sc);
            let (s2, m2) = scale_min_k4(2 * c + 1, sc);
            let (d1, mm1, d2, mm2) = (
                d * s1 as f32,
                dmin * m1 as f32,
                d * s2 as f32,
                dmin * m2 as f32,
            );
            for k in 0..32 {
                out.push(d1 * (q[32 * c + k] & 0xf) as f32 - mm1);
            }
            for k in 0..32 {
                out.push(d2 * (q[32 * c + k] >> 4) as f32 - mm2);
            }
        }
    }
    out
}

/// Dequantizes Q6_K super-blocks.
pub fn dequantize_q6_k(b: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(b.len() / 210 * QK_K);
    for blk in b.chunks_exact(210) {
        let ql = &blk[..128];
        let qh = &blk[128..192];
        let sc = &blk[192..208];
        let d = read_f16(&blk[208..210]);
        let mut y = [0f32; QK_K];
        for half in 0..2 {
            let (o, h, s, yo) = (64 * half, 32 * half, 8 * half, 128 * half);
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[o + l] & 0xf) | ((qh[h + l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[o + l + 32] & 0xf) | (((qh[h + l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[o + l] >> 4) | (((qh[h + l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[o + l + 32] >> 4) | (((qh[h + l] >> 6) & 3) << 4)) as i32 - 32;
                y[yo + l] = d * (sc[s + is] as i8) as f32 * q1 as f32;
                y[yo + l + 32] = d * (sc[s + is + 2] as i8) as f32 * q2 as f32;
                y[yo + l + 64] = d * (sc[s + is + 4] as i8) as f32 * q3 as f32;
                y[yo + l + 96] = d * (sc[s + is + 6] as i8) as f32 * q4 as f32;
            }
        }
        out.extend_from_slice(&y);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // A deterministic, roughly Gaussian-looking signal with outliers.
        (0..n)
            .map(|i| {
                let t = (i as f32 * 0.7548 + seed as f32 * 1.37).sin() * 43758.547;
                let u = t - t.floor() - 0.5;
                u * 0.05 + if i % 97 == 0 { 0.2 } else { 0.0 }
            })
            .collect()
    }

    fn rel_rmse(a: &[f32], b: &[f32]) -> f32 {
        let e: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let s: f32 = a.iter().map(|x| x * x).sum();
        (e / s).sqrt()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
        assert_eq!(nearest_int(7.6), 8);
    }

    #[test]
    fn quantizers_round_trip_within_their_error_bounds() {
        let x = data(4 * QK_K, 3);
        let q8 = dequantize_q8_0(&quantize_q8_0(&x));
        let q5 = dequantize_q5_0(&quantize_q5_0(&x));
        let q4 = dequantize_q4_k(&quantize_q4_k(&x));
        let q6 = dequantize_q6_k(&quantize_q6_k(&x));
        // Per-element bound of Q8_0: half a step of amax/127 (plus f16 rounding of d).
        for (b, (a, q)) in x.chunks(32).zip(x.chunks(32).zip(q8.chunks(32))) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (u, v) in a.iter().zip(q) {
                assert!((u - v).abs() <= amax / 127.0 * 0.51 + amax * 1e-3);
            }
        }
        let (e8, e5, e4, e6) = (
            rel_rmse(&x, &q8),
            rel_rmse(&x, &q5),
            rel_rmse(&x, &q4),
            rel_rmse(&x, &q6),
        );
        assert!(
            e8 < 0.02 && e6 < 0.05 && e5 < 0.12 && e4 < 0.12,
            "{e8} {e6} {e5} {e4}"
        );
        assert!(e8 < e6 && e6 < e5 && e6 < e4, "{e8} {e6} {e5} {e4}");
        // Zero blocks stay zero.
        let z = vec![0f32; QK_K];
        assert!(
            dequantize_q4_k(&quantize_q4_k(&z))
                .iter()
                .all(|v| *v == 0.0)
        );
        assert!(
            dequantize_q6_k(&quantize_q6_k(&z))
                .iter()
                .all(|v| *v == 0.0)
        );
    }
}
