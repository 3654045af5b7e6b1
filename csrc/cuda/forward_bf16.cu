// Forward kernels for __nv_bfloat16 inputs (explicit instantiation). Torch-free.
#include "cuda/forward_launch.cuh"

namespace cmpe_se {
CMPE_SE_INSTANTIATE_FORWARD(__nv_bfloat16)
}  // namespace cmpe_se
