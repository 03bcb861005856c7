// The example model, layer for layer the same as examples/cpp/interop_check.py's PyNet:
// embed -> fc1 -> bn (eval) -> relu -> norm -> fc2, so both produce the same state dict keys.
#pragma once

#include <torch/torch.h>

struct NetImpl : torch::nn::Module {
  NetImpl()
      : embed(register_module("embed", torch::nn::Embedding(100, 16))),
        fc1(register_module("fc1", torch::nn::Linear(16, 32))),
        bn(register_module("bn", torch::nn::BatchNorm1d(32))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({32})))),
        fc2(register_module("fc2", torch::nn::Linear(32, 100))) {}

  torch::Tensor forward(const torch::Tensor& tokens) {
    auto x = fc1(embed(tokens).mean(1));
    return fc2(norm(torch::relu(bn(x))));
  }

  torch::nn::Embedding embed;
  torch::nn::Linear fc1;
  torch::nn::BatchNorm1d bn;
  torch::nn::LayerNorm norm;
  torch::nn::Linear fc2;
};
TORCH_MODULE(Net);
