// zerockpt from a libtorch program.
//   zerockpt_example init WEIGHTS              seeded model -> WEIGHTS
//   zerockpt_example forward WEIGHTS IN OUT    WEIGHTS into the model, forward(IN["tokens"]) -> OUT
//   zerockpt_example selftest DIR              C++-only checks of save/load/load_state_dict
#include <zerockpt/zerockpt.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include "net.h"

namespace {

int init(const std::string& weights) {
  torch::manual_seed(0);
  Net net;
  torch::NoGradGuard no_grad;
  net->bn->running_mean.uniform_(-0.5, 0.5);  // non-trivial buffers, so they must round-trip
  net->bn->running_var.uniform_(0.5, 2.0);
  net->bn->num_batches_tracked.fill_(7);
  zerockpt::save(*net, weights);
  return 0;
}

int forward(const std::string& weights, const std::string& in, const std::string& out) {
  Net net;
  net->eval();
  zerockpt::load_state_dict(*net, weights);  // strict: throws on any mismatch
  torch::NoGradGuard no_grad;
  auto tokens = zerockpt::load(in)["tokens"];
  zerockpt::TensorDict result;
  result.insert("logits", net->forward(tokens));
  zerockpt::save(result, out);
  return 0;
}

int failures = 0;
int checks = 0;

void check(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::cerr << "FAILED: " << what << "\n";
  }
}

template <typename Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const zerockpt::Error& e) {
    return e.what();
  }
  return "";
}

int selftest(const std::string& dir) {
  torch::manual_seed(1);
  // Round trip, aliases included, zero-copy and eager.
  auto w = torch::randn({8, 4});
  zerockpt::TensorDict tensors;
  tensors.insert("w", w);
  tensors.insert("strided", torch::randn({5, 7}).t());
  tensors.insert("tied", w);
  tensors.insert("half", torch::randn({3}).to(torch::kHalf));
  const std::string file = dir + "/selftest.safetensors";
  zerockpt::save(tensors, file);
  for (bool mmap : {true, false}) {
    zerockpt::LoadOptions options;
    options.mmap = mmap;
    auto loaded = zerockpt::load(file, options);
    check(loaded.keys() == tensors.keys(), "keys in saved order");
    for (const auto& item : tensors) {
      check(torch::equal(loaded[item.key()], item.value()), "values of " + item.key());
    }
    check(loaded["tied"].is_same(loaded["w"]), "alias restored as the same tensor");
  }

  // load_state_dict: exact copy, then mismatches.
  Net a, b;
  const std::string weights = dir + "/net.safetensors";
  zerockpt::save(*a, weights);
  auto result = zerockpt::load_state_dict(*b, weights);
  check(result.missing_keys.empty() && result.unexpected_keys.empty(), "no missing/unexpected");
  check(torch::equal(a->fc2->weight, b->fc2->weight), "parameters copied");
  check(torch::equal(a->bn->running_var, b->bn->running_var), "buffers copied");
  auto keys = zerockpt::state_dict(*a).keys();
  check(keys.front() == "embed.weight" && keys.back() == "fc2.bias", "Python key order");

  zerockpt::TensorDict partial;
  partial.insert("fc1.weight", torch::zeros({32, 16}));
  partial.insert("extra", torch::ones({1}));
  zerockpt::save(partial, dir + "/partial.safetensors");
  std::string message =
      error_of([&] { zerockpt::load_state_dict(*b, dir + "/partial.safetensors"); });
  check(message.find("Missing key(s) in state_dict: \"embed.weight\"") != std::string::npos,
        "strict reports missing keys: " + message);
  check(message.find("Unexpected key(s) in state_dict: \"extra\"") != std::string::npos,
        "strict reports unexpected keys");
  check(!torch::equal(b->fc1->weight, torch::zeros({32, 16})), "strict failure changes nothing");
  auto loose = zerockpt::load_state_dict(*b, dir + "/partial.safetensors", /*strict=*/false);
  check(loose.unexpected_keys == std::vector<std::string>{"extra"}, "non-strict unexpected");
  check(loose.missing_keys.size() == zerockpt::state_dict(*b).size() - 1, "non-strict missing");
  check(torch::equal(b->fc1->weight, torch::zeros({32, 16})), "non-strict copies what matches");

  zerockpt::TensorDict wrong;
  wrong.insert("fc1.weight", torch::zeros({3, 3}));
  zerockpt::save(wrong, dir + "/wrong.safetensors");
  message = error_of(
      [&] { zerockpt::load_state_dict(*b, dir + "/wrong.safetensors", /*strict=*/false); });
  check(message.find("size mismatch for fc1.weight") != std::string::npos, "size mismatch");

  // Errors are typed and name the file.
  std::ofstream(dir + "/garbage.safetensors") << "not a checkpoint at all";
  try {
    zerockpt::load(dir + "/garbage.safetensors");
    check(false, "garbage loads");
  } catch (const zerockpt::FormatError& e) {
    check(std::string(e.what()).find("garbage.safetensors") != std::string::npos, "names file");
  }
  try {
    zerockpt::load(dir + "/missing.safetensors");
    check(false, "missing file loads");
  } catch (const zerockpt::IoError& e) {
    check(e.err() == ENOENT, "ENOENT");
  }

  // Checksums: a flipped byte is named by verify, and ignored without it.
  {
    std::fstream f(weights, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(0, std::ios::end);
    auto last = static_cast<std::streamoff>(f.tellg()) - 1;
    f.seekg(last);
    char c = 0;
    f.get(c);
    f.seekp(last);
    f.put(static_cast<char>(c ^ 1));
  }
  zerockpt::LoadOptions verify;
  verify.verify = true;
  try {
    zerockpt::load(weights, verify);
    check(false, "a corrupted file verifies");
  } catch (const zerockpt::ChecksumError& e) {
    check(std::string(e.what()).find("net.safetensors") != std::string::npos, "names the file");
  }
  message = error_of([&] { zerockpt::load_state_dict(*b, weights, true, /*verify=*/true); });
  check(message.find("CRC-32C") != std::string::npos, "load_state_dict verifies: " + message);
  check(zerockpt::load(weights).size() == zerockpt::state_dict(*a).size(), "unverified loads");

  // save_async: the file holds the values at the time of the call; errors come from get().
  {
    auto state = torch::randn({256, 256});
    auto before = state.clone();
    zerockpt::TensorDict snapshot;
    snapshot.insert("state", state);
    const std::string async_file = dir + "/async.safetensors";
    zerockpt::SaveFuture pending = zerockpt::save_async(snapshot, async_file);
    state.add_(1);
    pending.get();
    check(pending.done() && pending.path() == async_file, "save_async done");
    check(torch::equal(zerockpt::load(async_file)["state"], before), "save_async snapshot");
    auto failed = zerockpt::save_async(snapshot, dir + "/no-such-dir/async.safetensors");
    check(failed.wait(), "a failed save_async finishes");
    try {
      failed.get();
      check(false, "a save_async into a missing directory succeeds");
    } catch (const zerockpt::IoError& e) {
      check(e.err() == ENOENT, "save_async error is ENOENT");
    }
    zerockpt::save_async(*a, dir + "/net_async.safetensors").get();
    auto from_async = zerockpt::load(dir + "/net_async.safetensors");
    check(torch::equal(from_async["fc2.weight"], a->fc2->weight), "save_async of a module");
  }

  std::cout << (checks - failures) << " passed, " << failures << " failed\n";
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);  // bitwise-identical math on both sides of the interop test
  std::string mode = argc > 1 ? argv[1] : "";
  try {
    if (mode == "init" && argc == 3) return init(argv[2]);
    if (mode == "forward" && argc == 5) return forward(argv[2], argv[3], argv[4]);
    if (mode == "selftest" && argc == 3) return selftest(argv[2]);
  } catch (const std::exception& e) {
    std::cerr << "zerockpt_example: " << e.what() << "\n";
    return 1;
  }
  std::cerr << "usage: zerockpt_example init WEIGHTS | forward WEIGHTS IN OUT | selftest DIR\n";
  return 2;
}
