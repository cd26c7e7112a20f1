// Views of paged caches in the layouts engines allocate (include/msa/paged.h).
#include "msa/error.h"
#include "msa/paged.h"

namespace msa {

TensorView head_major_kv_cache(void* data, DType dtype, int64_t num_pages, int block_size, int num_kv_heads,
                               int head_dim, Device device, int64_t page_stride) {
  MSA_CHECK_ARG(num_pages >= 0, "num_pages", "must be non-negative, got " + std::to_string(num_pages));
  MSA_CHECK_ARG(block_size > 0 && num_kv_heads > 0 && head_dim > 0, "block_size",
                "block_size, num_kv_heads and head_dim must be positive");
  const int64_t page = int64_t(num_kv_heads) * block_size * head_dim;
  MSA_CHECK_ARG(page_stride == 0 || page_stride >= page, "page_stride",
                "must be 0 (packed pages) or at least Hkv * B * D = " + std::to_string(page) + ", got " +
                    std::to_string(page_stride));
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = 4;
  const int64_t shape[4] = {num_pages, block_size, num_kv_heads, head_dim};
  const int64_t stride[4] = {page_stride ? page_stride : page, head_dim, int64_t(block_size) * head_dim, 1};
  for (int d = 0; d < 4; ++d) {
    t.shape[d] = shape[d];
    t.stride[d] = stride[d];
  }
  return t;
}

}  // namespace msa
