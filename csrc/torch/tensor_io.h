// Tensors <-> safetensors files. Knows ATen, never Python: callers convert arguments first and
// may run these without the GIL. Loaded CPU tensors are zero-copy views of a private mapping
// that lives as long as any of them; aliases (tied tensors) come back as the same tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/hash.h"
#include "core/header.h"
#include "core/io_engine.h"
#include "core/reader.h"

namespace zerockpt {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// The metadata keys zerockpt owns (kReservedPrefix, kVersionKey, kAliasesKey,
// kStateDictMetadataKey, kChecksumKey) are defined with the format, in core/header.h.
constexpr const char* kFormatVersion = "1";

// A planned save: the header, where each stored tensor goes, and where its bytes come from.
struct SavePlan {
  Layout layout;
  std::vector<TensorSpec> specs;
  std::vector<WriteSource> sources;  // per spec; for CPU tensors only
  std::vector<at::Tensor> tensors;   // per spec: the (detached) tensor stored
};

// Throws DtypeError or UsageError naming `name` unless `t` is a tensor save can store: strided,
// with memory of its own that holds the whole view (tensor_views.h), of a format dtype.
void check_savable(const std::string& name, const at::Tensor& t);

// Checks `tensors` and plans their file (see save_tensors). Tensors not on the CPU get empty
// sources, for the caller to copy.
SavePlan plan_save(const NamedTensors& tensors, const std::string& path, const Metadata& metadata,
                   const WriteOptions& options, const Metadata& own);

// Saves `tensors` (strided, any layout in memory, on the CPU or any device with memory; device
// bytes go through pinned staging, see device_staging.h) with `metadata`. Tensors that are the
// same view of one storage are written once (the others recorded as aliases); different
// views whose bytes overlap are a UsageError naming both. `metadata` may not use reserved keys;
// `own` holds zerockpt's (reserved) keys.
void save_tensors(const NamedTensors& tensors, const std::string& path, const Metadata& metadata,
                  const WriteOptions& options, const Metadata& own = {});

// The same save into `sink` (write_planned: no atomic file, no fsync), with `name` for errors
// and progress; `plan` from plan_save(). Returns the number of bytes written.
uint64_t save_tensors_to(SavePlan plan, WriteSink& sink, const std::string& name,
                         const WriteOptions& options);

// The torch sizes of a stored tensor (F4: the last dimension halved, see torch/dtypes.h);
// DtypeError naming it if an F4 shape has no torch equivalent (0-dim, or an odd last
// dimension), FormatError if the sizes (or the contiguous strides torch would compute) do not
// fit int64.
std::vector<int64_t> torch_sizes(const TensorRecord& record, const std::string& path);

// An open file with alias resolution: names in saved order, aliases included.
class CheckpointFile {
 public:
  explicit CheckpointFile(const std::string& path);
  // An already opened file (e.g. from a descriptor), named by its path() in errors.
  explicit CheckpointFile(std::shared_ptr<SafetensorsFile> file);
  // Checks a header as opening a file holding it does (aliases, names); FormatError naming
  // `path`. The writer runs it on each planned header, so what it commits opens.
  static void check_header(const Header& header, const std::string& path);
  const SafetensorsFile& file() const { return *file_; }
  SafetensorsFile& file() { return *file_; }
  const std::vector<std::string>& names() const { return names_; }
  // The stored record for `name` (an alias resolves to its target); nullptr if absent.
  const TensorRecord* find(const std::string& name) const;
  // The target of an alias, or nullptr when `name` is stored under its own name.
  const std::string* alias_target(const std::string& name) const;
  // A mapped (zero-copy) tensor, or a fresh copy read with pread when !mmap.
  at::Tensor tensor(const TensorRecord& record, bool mmap);
  // Every tensor, in saved order; aliases are the same at::Tensor as their target. With
  // `verify`, the bytes are checked against the stored checksums (ChecksumError naming the
  // tensors that fail); a file without checksums loads unchecked. `progress` (may be null)
  // counts the bytes read or checked; a mapping without verify counts as done at once.
  NamedTensors load_all(bool mmap, unsigned threads, bool verify = false,
                        Progress* progress = nullptr);

 private:
  CheckpointFile() = default;
  void index_header(const Header& h, const std::string& path);

  std::shared_ptr<SafetensorsFile> file_;
  std::vector<std::string> names_;
  SeededMap<std::string, size_t> record_index_;  // stored name -> header index
  SeededMap<std::string, std::string> alias_to_target_;
};

}  // namespace zerockpt
