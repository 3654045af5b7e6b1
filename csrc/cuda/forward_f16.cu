// Forward kernels for __half inputs (explicit instantiation). Torch-free.
#include "cuda/forward_launch.cuh"

namespace cmpe_se {
CMPE_SE_INSTANTIATE_FORWARD(__half)
}  // namespace cmpe_se
