// Backward kernels for float inputs (explicit instantiation). Torch-free.
#include "cuda/backward_launch.cuh"

namespace cmpe_se {
CMPE_SE_INSTANTIATE_BACKWARD(float)
}  // namespace cmpe_se
