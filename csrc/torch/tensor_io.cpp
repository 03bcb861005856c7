#include "torch/tensor_io.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "torch/device_staging.h"
#include "torch/dtypes.h"
#include "torch/tensor_views.h"
#include "zerockpt/errors.h"

namespace zerockpt {

namespace {

std::string describe(const std::string& name) { return "tensor " + quote(name); }

// Copies elements [e0, e1) of `t` in row-major order to `dst`, whatever its strides, conj or
// neg bits: contiguous runs by memcpy, the rest by copy_ into a view of `dst`. Recurses into
// rows only at the two ends of the range, so each call does O(dim) copies.
void copy_elements(const at::Tensor& t, int64_t e0, int64_t e1, uint8_t* dst) {
  if (e0 >= e1) return;
  const int64_t item = static_cast<int64_t>(t.element_size());
  if (t.is_contiguous() && !t.is_conj() && !t.is_neg()) {
    std::memcpy(dst, static_cast<const uint8_t*>(t.const_data_ptr()) + e0 * item,
                static_cast<size_t>((e1 - e0) * item));
    return;
  }
  auto options = at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU);
  if (t.dim() == 0) {
    at::from_blob(dst, {}, options).copy_(t);
    return;
  }
  const int64_t row = t.numel() / t.size(0);
  int64_t i = e0 / row;
  if (e0 % row != 0) {
    int64_t stop = std::min(e1 - i * row, row);
    copy_elements(t.select(0, i), e0 - i * row, stop, dst);
    dst += (i * row + stop - e0) * item;
    ++i;
  }
  int64_t full_end = e1 / row;
  if (i < full_end) {
    auto sizes = t.sizes().vec();
    sizes[0] = full_end - i;
    at::from_blob(dst, sizes, options).copy_(t.narrow(0, i, full_end - i));
    dst += (full_end - i) * row * item;
    i = full_end;
  }
  if (e1 % row != 0 && e1 / row >= i) copy_elements(t.select(0, e1 / row), 0, e1 % row, dst);
}

// Tensors that are the same view of one storage are stored once: returns, per entry, the index
// of the entry it aliases, or -1. Different views that overlap are a UsageError naming two.
std::vector<int64_t> find_aliases(const NamedTensors& tensors) {
  std::vector<at::Tensor> views;
  views.reserve(tensors.size());
  for (const auto& entry : tensors) views.push_back(entry.second);
  MemorySharing sharing = find_memory_sharing(views);
  if (sharing.conflict) {
    throw UsageError(
        "tensors " + quote(tensors[sharing.conflict->first].first) + " and " +
        quote(tensors[sharing.conflict->second].first) +
        " are different views whose memory overlaps in one storage; the file could not "
        "restore that sharing. Save a .clone() of one of them (or make them the same "
        "tensor, as tied weights are)");
  }
  return std::move(sharing.alias_of);
}

}  // namespace

namespace {

// What is committed must load with this library: the planned header goes through the reader's
// own parser and decoders before anything is written (a bug here would otherwise only show
// when the checkpoint is needed). Costs a parse of the header, small beside the write.
void check_loadable(const Layout& layout, const std::string& path) {
  try {
    const uint64_t json_size = layout.prefix.size() - 8;
    Header header = parse_header(layout.prefix.data() + 8, json_size, layout.file_size(), path);
    CheckpointFile::check_header(header, path);
  } catch (const FormatError& e) {
    throw UsageError(std::string("zerockpt cannot write a header that loads back: ") + e.what());
  }
}

}  // namespace

void check_savable(const std::string& name, const at::Tensor& t) {
  if (!t.defined()) throw UsageError(describe(name) + " is an undefined tensor");
  check_memory(describe(name), t);
  if (!to_format_dtype(t.scalar_type())) {
    throw DtypeError(
        describe(name) + " has dtype " + std::string(c10::toString(t.scalar_type())) +
        ", which the safetensors format cannot store (supported: bool, uint8/16/32/64, "
        "int8/16/32/64, float16, bfloat16, float32, float64, complex64, float8 types, "
        "float4_e2m1fn_x2)");
  }
  if (t.scalar_type() == c10::ScalarType::Float4_e2m1fn_x2 && t.dim() == 0) {
    // The format's F4 shape counts 4-bit values along the last dimension; with none, a
    // torch element (two values) has no shape there (safetensors refuses it too).
    throw DtypeError(describe(name) +
                     " is a 0-dim float4_e2m1fn_x2 tensor, which the safetensors format cannot "
                     "store (its F4 shape counts the two 4-bit values of each element along the "
                     "last dimension): save it with shape [1] (.reshape(1))");
  }
}

SavePlan plan_save(const NamedTensors& tensors, const std::string& path, const Metadata& metadata,
                   const WriteOptions& options, const Metadata& own) {
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") {
      throw UsageError(describe(name) +
                       ": the name is reserved by the safetensors format for the header's "
                       "metadata (zerockpt.save stores such a key as nested state)");
    }
    check_savable(name, t);
  }
  for (const auto& [key, value] : metadata) {
    if (key.rfind(kReservedPrefix, 0) == 0) {
      throw UsageError("metadata key " + quote(key) + " is reserved for zerockpt (prefix '" +
                       kReservedPrefix + "')");
    }
  }
  std::vector<int64_t> alias_of = find_aliases(tensors);

  SavePlan plan;
  auto& specs = plan.specs;
  auto& sources = plan.sources;
  std::vector<Alias> aliases;
  specs.reserve(tensors.size());
  sources.reserve(tensors.size());
  plan.tensors.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    if (alias_of[i] >= 0) {
      aliases.push_back({name, tensors[static_cast<size_t>(alias_of[i])].first, i});
      continue;
    }
    TensorSpec spec;
    spec.name = name;
    spec.dtype = *to_format_dtype(t.scalar_type());
    spec.shape = format_shape(spec.dtype, t.sizes());
    spec.nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    WriteSource source;
    if (!t.device().is_cpu()) {
      // Staged through host memory (save_tensors) or copied by the caller (save_async).
    } else if (t.is_contiguous() && !t.is_conj() && !t.is_neg()) {
      source.data = static_cast<const uint8_t*>(t.const_data_ptr());
    } else {
      // Strided, conjugate or negative views are produced piecewise into bounded staging.
      at::Tensor view = t.detach();
      int64_t item = static_cast<int64_t>(t.element_size());
      source.fill = [view, item](uint64_t offset, uint64_t size, uint8_t* dst) {
        c10::AutoGradMode no_grad(false);
        int64_t e0 = static_cast<int64_t>(offset) / item;
        copy_elements(view, e0, e0 + static_cast<int64_t>(size) / item, dst);
      };
    }
    specs.push_back(std::move(spec));
    sources.push_back(std::move(source));
    plan.tensors.push_back(detach_shared(t));  // held for the write, outside autograd
  }

  Metadata all = metadata;
  bool has_format = std::any_of(metadata.begin(), metadata.end(),
                                [](const auto& kv) { return kv.first == "format"; });
  if (!has_format) all.emplace_back("format", "pt");  // what Hugging Face loaders look for
  all.emplace_back(kVersionKey, kFormatVersion);
  all.insert(all.end(), own.begin(), own.end());
  if (!aliases.empty()) all.emplace_back(kAliasesKey, encode_aliases(aliases));

  plan.layout = plan_layout(specs, all, path, options.checksums);
  check_loadable(plan.layout, path);
  return plan;
}

namespace {

// write(plan, options) with device tensors (or all, with host staging on) brought to host
// memory through a bounded pool of pinned chunks, copied ahead of the writers: never a host
// copy of the whole state.
template <typename Write>
void write_staged(SavePlan& plan, const WriteOptions& options, Write write) {
  std::vector<at::Tensor> staged(plan.specs.size());
  bool any_staged = false;
  for (size_t i = 0; i < plan.specs.size(); ++i) {
    if (plan.specs[i].nbytes == 0 || !is_staged(plan.tensors[i])) continue;
    plan.sources[i] = WriteSource();
    plan.sources[i].staged = true;
    staged[i] = plan.tensors[i];
    any_staged = true;
  }
  if (!any_staged) {
    write(options);
    return;
  }
  std::unique_ptr<ChunkStager> stager =
      make_device_stager(std::move(staged), options.staging_bytes);
  WriteOptions staged_options = options;
  staged_options.stager = stager.get();
  write(staged_options);
}

}  // namespace

void save_tensors(const NamedTensors& tensors, const std::string& path, const Metadata& metadata,
                  const WriteOptions& options, const Metadata& own) {
  SavePlan plan = plan_save(tensors, path, metadata, options, own);
  write_staged(plan, options, [&](const WriteOptions& o) {
    write_file(path, plan.layout, plan.specs, plan.sources, o);
  });
}

uint64_t save_tensors_to(SavePlan plan, WriteSink& sink, const std::string& name,
                         const WriteOptions& options) {
  write_staged(plan, options, [&](const WriteOptions& o) {
    write_planned(sink, name, plan.layout, plan.specs, plan.sources, o);
  });
  return plan.layout.file_size();
}

std::vector<int64_t> torch_sizes(const TensorRecord& r, const std::string& path) {
  std::vector<uint64_t> shape = r.shape;
  if (const int64_t per_item = values_per_item(r.dtype); per_item != 1) {
    if (shape.empty() || shape.back() % static_cast<uint64_t>(per_item) != 0) {
      throw DtypeError(path + ": " + describe(r.name) + " has dtype " + dtype_name(r.dtype) +
                       " and shape [" + c10::Join(", ", r.shape) + "], which has no torch " +
                       "equivalent: " + c10::toString(*to_scalar_type(r.dtype)) + " holds " +
                       std::to_string(per_item) + " values per element, along the last " +
                       "dimension, which must be a multiple of " + std::to_string(per_item));
    }
    shape.back() /= static_cast<uint64_t>(per_item);
  }
  // torch computes contiguous strides as products of max(size, 1), even for empty tensors.
  constexpr auto kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  std::vector<int64_t> sizes;
  sizes.reserve(shape.size());
  uint64_t product = 1;
  for (uint64_t d : shape) {
    uint64_t factor = std::max<uint64_t>(d, 1);
    if (d > kMax || product > kMax / factor) {
      throw FormatError(path + ": " + describe(r.name) + ": shape [" + c10::Join(", ", r.shape) +
                        "] does not fit torch's int64 sizes and strides");
    }
    product *= factor;
    sizes.push_back(static_cast<int64_t>(d));
  }
  return sizes;
}

CheckpointFile::CheckpointFile(const std::string& path)
    : file_(std::make_shared<SafetensorsFile>(path)) {
  index_header(file_->header(), path);
}

CheckpointFile::CheckpointFile(std::shared_ptr<SafetensorsFile> file) : file_(std::move(file)) {
  index_header(file_->header(), file_->path());
}

void CheckpointFile::check_header(const Header& header, const std::string& path) {
  CheckpointFile probe;
  probe.index_header(header, path);
  decode_checksums(header, path);
}

void CheckpointFile::index_header(const Header& h, const std::string& path) {
  record_index_.reserve(h.tensors.size());
  for (size_t i = 0; i < h.tensors.size(); ++i) record_index_.emplace(h.tensors[i].name, i);

  std::vector<Alias> aliases;
  for (const auto& [key, value] : h.metadata) {
    if (key == kAliasesKey) aliases = decode_aliases(value, path);
  }
  size_t total = h.tensors.size() + aliases.size();
  names_.reserve(total);
  size_t next_stored = 0;
  for (size_t a = 0; a < aliases.size(); ++a) {
    const Alias& alias = aliases[a];
    // Positions increase, and the stored names before each alias must exist.
    if (alias.position >= total || (a > 0 && alias.position <= aliases[a - 1].position) ||
        alias.position - names_.size() > h.tensors.size() - next_stored) {
      throw FormatError(path + ": alias " + quote(alias.name) + " has an invalid position " +
                        std::to_string(alias.position));
    }
    if (!record_index_.count(alias.target)) {
      throw FormatError(path + ": alias " + quote(alias.name) + " refers to " +
                        quote(alias.target) + ", which the file does not hold");
    }
    if (record_index_.count(alias.name) ||
        !alias_to_target_.emplace(alias.name, alias.target).second) {
      throw FormatError(path + ": alias " + quote(alias.name) + " is a duplicate name");
    }
    while (names_.size() < alias.position) names_.push_back(h.tensors[next_stored++].name);
    names_.push_back(alias.name);
  }
  while (next_stored < h.tensors.size()) names_.push_back(h.tensors[next_stored++].name);
}

const TensorRecord* CheckpointFile::find(const std::string& name) const {
  auto alias = alias_to_target_.find(name);
  const std::string& stored = alias == alias_to_target_.end() ? name : alias->second;
  auto it = record_index_.find(stored);
  return it == record_index_.end() ? nullptr : &file_->header().tensors[it->second];
}

const std::string* CheckpointFile::alias_target(const std::string& name) const {
  auto alias = alias_to_target_.find(name);
  return alias == alias_to_target_.end() ? nullptr : &alias->second;
}

namespace {

struct TensorShape {
  std::vector<int64_t> sizes;
  c10::ScalarType dtype;
};

TensorShape torch_shape(const TensorRecord& r, const std::string& path) {
  auto scalar = to_scalar_type(r.dtype);
  if (!scalar) {
    throw DtypeError(path + ": " + describe(r.name) + " has dtype " + dtype_name(r.dtype) +
                     ", which has no torch equivalent");
  }
  return {torch_sizes(r, path), *scalar};
}

void release_mapping(void* ctx) { delete static_cast<std::shared_ptr<Mapping>*>(ctx); }

}  // namespace

at::Tensor CheckpointFile::tensor(const TensorRecord& r, bool mmap) {
  const std::string& path = file_->path();
  TensorShape shape = torch_shape(r, path);
  auto options = at::TensorOptions().dtype(shape.dtype).device(at::kCPU);
  uint64_t file_offset = file_->header().data_start + r.begin;
  size_t item = c10::elementSize(shape.dtype);
  // An empty tensor gets a storage of its own: a view of the mapping would have the address of
  // the next tensor, which torch.save then takes for the same data viewed as another dtype.
  if (mmap && r.nbytes() > 0) {
    auto mapping = file_->mapping();
    uint8_t* ptr = mapping->data() + file_offset;
    if (reinterpret_cast<uintptr_t>(ptr) % item == 0) {
      return at::for_blob(ptr, shape.sizes)
          .context(new std::shared_ptr<Mapping>(std::move(mapping)), release_mapping)
          .options(options)
          .make_tensor();
    }
    // Other writers may leave a tensor misaligned for its dtype: copy that one.
    at::Tensor t = at::empty(shape.sizes, options);
    std::memcpy(t.mutable_data_ptr(), ptr, r.nbytes());
    return t;
  }
  at::Tensor t = at::empty(shape.sizes, options);
  if (r.nbytes() > 0) {
    pread_full(file_->fd(), t.mutable_data_ptr(), r.nbytes(), file_offset, path);
  }
  return t;
}

NamedTensors CheckpointFile::load_all(bool mmap, unsigned threads, bool verify,
                                      Progress* progress) {
  const Header& h = file_->header();
  std::vector<at::Tensor> stored(h.tensors.size());
  if (mmap) {
    // Verified through the mapping first: the pages are those the tensors will view.
    bool checked = false;
    if (verify) {
      VerifyResult result = file_->verify(threads, progress);
      file_->raise_on_failure(result);
      checked = result.has_checksums;
    }
    if (progress && !checked) {
      uint64_t total = 0;
      for (const auto& r : h.tensors) total += r.nbytes();
      expect_progress(progress, total, "mapping " + file_->path());
      progress->add(total);  // nothing to read now: the mapping is the result
    }
    for (size_t i = 0; i < h.tensors.size(); ++i) stored[i] = tensor(h.tensors[i], true);
  } else {
    std::vector<ReadRange> ranges;
    ranges.reserve(h.tensors.size());
    for (size_t i = 0; i < h.tensors.size(); ++i) {
      const auto& r = h.tensors[i];
      TensorShape shape = torch_shape(r, file_->path());
      stored[i] = at::empty(shape.sizes, at::TensorOptions().dtype(shape.dtype));
      if (r.nbytes() > 0) {
        ranges.push_back({h.data_start + r.begin, r.nbytes(),
                          static_cast<uint8_t*>(stored[i].mutable_data_ptr())});
      }
    }
    read_ranges(file_->fd(), file_->path(), std::move(ranges), threads, progress);
    if (verify) {
      std::vector<ByteRange> bytes(h.tensors.size());
      for (size_t i = 0; i < h.tensors.size(); ++i) {
        bytes[i] = {static_cast<const uint8_t*>(stored[i].const_data_ptr()), h.tensors[i].nbytes()};
      }
      file_->raise_on_failure(file_->verify(bytes, false, threads));
    }
  }
  NamedTensors out;
  out.reserve(names_.size());
  for (const auto& name : names_) {
    const TensorRecord* r = find(name);
    out.emplace_back(name, stored[static_cast<size_t>(r - h.tensors.data())]);
  }
  return out;
}

}  // namespace zerockpt
