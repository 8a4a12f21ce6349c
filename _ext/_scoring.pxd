# Constants of the node-scoring kernel, shared at C level: `cimport _scoring` from a .pyx in
# _ext/ (scoring.pyx, built as nexus_fast._scoring_c). Declarations only: nothing is
# imported at run time.
#
# The rows of the feature-major matrix; the same values as nexus_fast/_scoring_py.py's
# ROW_* constants (the typed source of truth), which tests/unit/test_scoring.py checks
# through the compiled module's exports.

cdef enum:
    N_RESOURCES = 4  # cpu, memory, gpu, disk
    N_WEIGHTS = 5  # least, most, balanced, spread, fresh

cdef enum:  # rows
    ROW_FREE = 0  # cap - reserved: scored (ROW_FREE + j for resource j)
    ROW_AVAIL = 4  # cap - max(usage, reserved): filtered
    ROW_CAP = 8  # capacity
    ROW_TASKS = 12  # tasks placed on the node
    N_ROWS = 13
