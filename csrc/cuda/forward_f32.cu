// Forward kernels for float inputs (explicit instantiation). Torch-free.
#include "cuda/forward_launch.cuh"

namespace cmpe_se {
CMPE_SE_INSTANTIATE_FORWARD(float)
}  // namespace cmpe_se
