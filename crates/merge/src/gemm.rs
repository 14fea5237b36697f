//! `C += alpha · A·B` in f32 on strided matrices, through the `matrixmultiply`
//! crate (a well-kept, pure-Rust blocked GEMM with AVX2/FMA kernels).

use crate::error::{MergeError, Result};

/// A read-only strided matrix view: element `(i, j)` is `data[i*rs + j*cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The backing slice.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride (elements).
    pub rs: usize,
    /// Column stride (elements).
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|x| {
                (self.cols - 1)
                    .checked_mul(self.cs)
                    .and_then(|y| x.checked_add(y))
            })
            .is_some_and(|last| last < self.data.len())
    }
}

/// `c (row-major m×n) += alpha · a (m×k) · b (k×n)`.
pub fn add_product(c: &mut [f32], alpha: f32, a: View<'_>, b: View<'_>) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || c.len() != m * n || !a.fits() || !b.fits() {
        return Err(MergeError::Check(format!(
            "internal: GEMM shapes a {}x{} b {}x{} c {}",
            a.rows,
            a.cols,
            b.rows,
            b.cols,
            c.len()
        )));
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    // SAFETY: every index the kernel touches is inside the slices: `fits` checked the last
    // element of a and b, and c is exactly m*n row-major (rsc = n, csc = 1). The slices do
    // not alias (c is borrowed mutably).
    #[allow(unsafe_code)]
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            1.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_naive_product_with_transposes() {
        let (m, k, n) = (7, 3, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // n×k, used transposed
        let mut c = vec![1.0f32; m * n];
        add_product(
            &mut c,
            0.5,
            View::row_major(&a, m, k),
            View::row_major(&bt, n, k).t(),
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 =
                    1.0 + 0.5 * (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
        assert!(
            add_product(
                &mut c,
                1.0,
                View::row_major(&a, m, k),
                View::row_major(&a, m, k)
            )
            .is_err()
        );
    }
}
