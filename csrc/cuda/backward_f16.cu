// Backward kernels for __half inputs (explicit instantiation). Torch-free.
#include "cuda/backward_launch.cuh"

namespace cmpe_se {
CMPE_SE_INSTANTIATE_BACKWARD(__half)
}  // namespace cmpe_se
