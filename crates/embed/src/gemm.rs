//! A bounds-checked front for `matrixmultiply::sgemm`, which takes raw pointers and strides.

/// A strided read-only view: element (r, c) is `data[offset + r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A dense row-major `rows × cols` matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View { data, offset: 0, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose of a dense row-major `rows × cols` matrix (a `[out, in]` weight seen as `[in, out]`).
    pub fn dense_transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View { data, offset: 0, rows: cols, cols: rows, row_stride: 1, col_stride: cols }
    }

    pub fn t(self) -> Self {
        View { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn last_index(&self) -> usize {
        self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
    }
}

/// `c[offset..]` (rows × cols, row stride `c_row_stride`, unit column stride) = alpha · a·b + beta · c.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    c_offset: usize,
    c_row_stride: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "gemm: empty inner dimension");
    assert!(a.last_index() < a.data.len() && b.last_index() < b.data.len(), "gemm: operand out of bounds");
    assert!(c_offset + (m - 1) * c_row_stride + n <= c.len(), "gemm: output out of bounds");
    assert!(c_row_stride >= n, "gemm: output rows overlap");
    // SAFETY: every element the kernel reads or writes lies within the slices (checked above), the
    // output rows do not overlap, and `c` is borrowed mutably so it cannot alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr().add(a.offset),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr().add(b.offset),
            b.row_stride as isize,
            b.col_stride as isize,
            beta,
            c.as_mut_ptr().add(c_offset),
            c_row_stride as isize,
            1,
        );
    }
}
