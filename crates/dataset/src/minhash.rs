//! Near-duplicate detection: MinHash over word 3-grams with LSH banding.
//!
//! Each row gets 64 MinHash values (one 64-bit shingle hash, re-hashed by 64
//! multiply-add permutations), folded into 8 bands of 8. Two rows whose
//! Jaccard similarity is `J` share at least one band with probability
//! `1 - (1 - J^8)^8`: about 0.99 at J = 0.9, 0.77 at J = 0.8, 0.38 at J = 0.7
//! and 0.03 at J = 0.5. Only the band keys are kept (8 × 16 bytes per row),
//! not the signatures, so memory stays bounded by the row count.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bands per signature.
pub const BANDS: usize = 8;
/// MinHash values per band.
pub const ROWS_PER_BAND: usize = 8;
const PERMS: usize = BANDS * ROWS_PER_BAND;

fn perm(i: usize) -> (u64, u64) {
    // Odd multipliers and offsets from a fixed seed (splitmix64), so signatures are stable.
    let mut z = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let a = (z ^ (z >> 31)) | 1;
    let b = a.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (a, b)
}

/// The band keys of a text, or `None` when it has fewer than one shingle of words.
pub fn band_keys(text: &str) -> Option<[u64; BANDS]> {
    let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
    if words.is_empty() {
        return None;
    }
    let perms: Vec<(u64, u64)> = (0..PERMS).map(perm).collect();
    let mut mins = [u64::MAX; PERMS];
    let n = if words.len() >= 3 { words.len() - 2 } else { 1 };
    let mut buf = String::new();
    for i in 0..n {
        buf.clear();
        for w in words.iter().skip(i).take(3) {
            buf.push_str(w);
            buf.push(' ');
        }
        let h = xxh3_64_with_seed(buf.as_bytes(), 0x5eed);
        for (m, (a, b)) in mins.iter_mut().zip(&perms) {
            let v = a.wrapping_mul(h).wrapping_add(*b);
            if v < *m {
                *m = v;
            }
        }
    }
    let mut keys = [0u64; BANDS];
    for (b, key) in keys.iter_mut().enumerate() {
        let mut bytes = [0u8; ROWS_PER_BAND * 8 + 1];
        bytes[0] = b as u8;
        for (j, m) in mins[b * ROWS_PER_BAND..(b + 1) * ROWS_PER_BAND]
            .iter()
            .enumerate()
        {
            bytes[1 + j * 8..1 + (j + 1) * 8].copy_from_slice(&m.to_le_bytes());
        }
        *key = xxh3_64_with_seed(&bytes, 0xb4d5);
    }
    Some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_texts_share_a_band_and_different_ones_do_not() {
        let base = "list the customers in france with a credit limit above ten thousand and order them by name please";
        let near = "list the customers in france with a credit limit above ten thousand and order them by name thanks";
        let far = "how many employees work in the sydney office and who is their manager this year";
        let a = band_keys(base).unwrap();
        let b = band_keys(near).unwrap();
        let c = band_keys(far).unwrap();
        assert!(
            a.iter().zip(&b).any(|(x, y)| x == y),
            "near duplicates must collide"
        );
        assert!(
            !a.iter().zip(&c).any(|(x, y)| x == y),
            "unrelated texts must not collide"
        );
        assert_eq!(band_keys(base), Some(a), "deterministic");
        assert_eq!(band_keys("  "), None);
    }
}
