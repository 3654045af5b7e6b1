// Forward kernels for double inputs (explicit instantiation). Torch-free.
#include "cuda/forward_launch.cuh"

namespace cmpe_se {
CMPE_SE_INSTANTIATE_FORWARD(double)
}  // namespace cmpe_se
