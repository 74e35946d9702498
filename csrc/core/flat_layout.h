// Flat-buffer layout planning: where each of a list of tensors lives inside one flat buffer,
// how that buffer splits into equal per-rank shards (ZeRO), and how consecutive tensors group
// into communication buckets (data-parallel gradient all-reduce). Plain C++17, no torch: the
// planner only does integer arithmetic on element counts, so it is unit-tested on its own
// (csrc/tests/test_flat_layout.cpp) and bound to Python in csrc/py_flat_layout.cpp.
//
// All sizes and offsets are in elements of the buffer's dtype, never bytes, except the
// bucket capacity of plan_buckets, which is in bytes because that is how bucket sizes are
// configured (e.g. "25 MB buckets").
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace pyruntime {

// The part of one tensor that falls inside one rank's shard:
// tensor[tensor_offset : tensor_offset + numel] == shard[shard_offset : shard_offset + numel]
// (tensors viewed as 1-D, in row-major order).
struct ShardPiece {
  int64_t tensor_index;
  int64_t tensor_offset;
  int64_t shard_offset;
  int64_t numel;
};

bool operator==(const ShardPiece& a, const ShardPiece& b);

// Tensors [begin, end) of the input list form one bucket; numel is the bucket's flat size
// including the alignment gaps between its tensors (its FlatLayout span, world_size 1).
struct Bucket {
  int64_t begin;
  int64_t end;
  int64_t numel;
};

bool operator==(const Bucket& a, const Bucket& b);

// Lays tensors out in order. Tensor i starts at offsets()[i], a multiple of `align`, so a
// buffer whose base is aligned gives every tensor an aligned start (vectorised copies, and
// NCCL's preference for 16-byte-aligned chunks).
//
// total_numel() is padded up to a multiple of world_size * align, not just world_size: every
// shard then has a size that is a multiple of `align`, so every shard also starts aligned
// (reduce-scatter outputs and ZeRO shards are separate allocations whose contents are copied
// to/from the flat buffer). The price is at most world_size * align - 1 padding elements,
// negligible next to model tensors. Empty tensors get an aligned offset and no space.
class FlatLayout {
 public:
  // Throws std::invalid_argument for a negative numel, align < 1 or world_size < 1, and
  // when the padded total does not fit in int64.
  explicit FlatLayout(std::vector<int64_t> numels, int64_t world_size = 1, int64_t align = 16);

  const std::vector<int64_t>& numels() const { return numels_; }
  const std::vector<int64_t>& offsets() const { return offsets_; }
  int64_t num_tensors() const { return static_cast<int64_t>(numels_.size()); }
  int64_t world_size() const { return world_size_; }
  int64_t align() const { return align_; }
  int64_t total_numel() const { return total_numel_; }
  int64_t shard_numel() const { return total_numel_ / world_size_; }

  // [begin, end) of `rank`'s shard in the flat buffer. Throws std::invalid_argument when
  // rank is outside [0, world_size).
  std::pair<int64_t, int64_t> shard_range(int64_t rank) const;

  // The non-empty pieces of tensors inside `rank`'s shard, in buffer order. Over all ranks,
  // the pieces cover every element of every tensor exactly once.
  std::vector<ShardPiece> pieces(int64_t rank) const;

 private:
  void check_rank(int64_t rank) const;
  int64_t first_tensor_ending_after(int64_t position) const;

  std::vector<int64_t> numels_;
  std::vector<int64_t> offsets_;
  int64_t world_size_;
  int64_t align_;
  int64_t total_numel_;
};

// Groups consecutive tensors into buckets of at most bucket_bytes, where a bucket's size is
// its aligned flat span (Bucket::numel) times element_size. A new bucket starts whenever the
// next tensor would push the current one over the cap, so a tensor larger than the cap sits
// alone in its bucket. Empty tensors join the current bucket unless it is already over the
// cap (a lone oversized tensor). The order is the caller's: DDP passes parameters in
// reverse registration order because their gradients arrive that way.
// Throws std::invalid_argument for a negative numel, bucket_bytes <= 0, element_size < 1 or
// align < 1.
std::vector<Bucket> plan_buckets(const std::vector<int64_t>& numels, int64_t bucket_bytes,
                                 int64_t element_size, int64_t align = 1);

}  // namespace pyruntime
