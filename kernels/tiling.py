"""Tile scheduling shared by the GEMM-shaped kernels."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """``(pid_row, pid_col)`` of program ``pid`` over a ``rows × cols`` output in ``GROUP``-row
    bands (the Triton matmul tutorial's order): consecutive programs share a band of the second
    operand in L2 while they walk the rows of the first."""
    num_pid_rows = tl.cdiv(rows, BLOCK_ROWS)
    num_pid_cols = tl.cdiv(cols, BLOCK_COLS)
    num_pid_in_group = GROUP * num_pid_cols
    group_id = pid // num_pid_in_group
    first_pid_row = group_id * GROUP
    group_size = min(num_pid_rows - first_pid_row, GROUP)
    pid_row = first_pid_row + ((pid % num_pid_in_group) % group_size)
    pid_col = (pid % num_pid_in_group) // group_size
    return pid_row, pid_col
