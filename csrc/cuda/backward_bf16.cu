// Backward kernels for __nv_bfloat16 inputs (explicit instantiation). Torch-free.
#include "cuda/backward_launch.cuh"

namespace cmpe_se {
CMPE_SE_INSTANTIATE_BACKWARD(__nv_bfloat16)
}  // namespace cmpe_se
