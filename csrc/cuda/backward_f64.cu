// Backward kernels for double inputs (explicit instantiation). Torch-free.
#include "cuda/backward_launch.cuh"

namespace cmpe_se {
CMPE_SE_INSTANTIATE_BACKWARD(double)
}  // namespace cmpe_se
