// Every bad input to a public operation raises msa::ArgumentError whose argument() names the
// argument at fault: shapes, dtypes, strides, devices, lengths, settings, workspace, null pointers.
// Validation runs before any kernel, so these tests hold whatever the backends do.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "msa/error.h"
#include "msa/ops.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::TestProblem;

// Every tensor and setting any operation takes, valid for one small CPU problem.
struct Args {
  Config cfg;
  Varlen varlen;
  TensorView q, k, v, qi, ki, topk, selected_lse, out, lse, dout, dq, dk, dv, loss, dqi, dki;
  float temperature = 1.f, coeff = 1.f;
  Context ctx;
};

struct OpInfo {
  const char* name;
  Op op;
  std::vector<std::string> tensors;  // required tensor arguments
  std::function<void(const Args&)> call;
};

const std::vector<OpInfo>& operations() {
  static const std::vector<OpInfo> ops = {
      {"index_topk", Op::index_topk, {"qi", "ki", "topk"},
       [](const Args& a) {
         index_topk(a.cfg, a.varlen, a.qi, a.ki, a.topk, a.selected_lse, a.temperature, a.ctx);
       }},
      {"sparse_attention_forward", Op::sparse_forward, {"q", "k", "v", "topk", "out", "lse"},
       [](const Args& a) {
         sparse_attention_forward(a.cfg, a.varlen, a.q, a.k, a.v, a.topk, a.out, a.lse, a.ctx);
       }},
      {"sparse_attention_backward", Op::sparse_backward,
       {"q", "k", "v", "topk", "out", "lse", "dout", "dq", "dk", "dv"},
       [](const Args& a) {
         sparse_attention_backward(a.cfg, a.varlen, a.q, a.k, a.v, a.topk, a.out, a.lse, a.dout,
                                   a.dq, a.dk, a.dv, a.ctx);
       }},
      {"kl_alignment", Op::kl_alignment, {"q", "k", "lse", "qi", "ki", "loss", "dqi", "dki"},
       [](const Args& a) {
         kl_alignment(a.cfg, a.varlen, a.q, a.k, a.lse, a.qi, a.ki, a.topk, a.coeff, a.loss, a.dqi,
                      a.dki, a.ctx);
       }},
      {"dense_attention_forward", Op::dense_forward, {"q", "k", "v", "out", "lse"},
       [](const Args& a) {
         dense_attention_forward(a.cfg, a.varlen, a.q, a.k, a.v, a.out, a.lse, a.ctx);
       }},
      {"dense_attention_backward", Op::dense_backward,
       {"q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv"},
       [](const Args& a) {
         dense_attention_backward(a.cfg, a.varlen, a.q, a.k, a.v, a.out, a.lse, a.dout, a.dq, a.dk,
                                  a.dv, a.ctx);
       }},
  };
  return ops;
}

TensorView& tensor(Args& a, const std::string& name) {
  if (name == "q") return a.q;
  if (name == "k") return a.k;
  if (name == "v") return a.v;
  if (name == "qi") return a.qi;
  if (name == "ki") return a.ki;
  if (name == "topk") return a.topk;
  if (name == "selected_lse") return a.selected_lse;
  if (name == "out") return a.out;
  if (name == "lse") return a.lse;
  if (name == "dout") return a.dout;
  if (name == "dq") return a.dq;
  if (name == "dk") return a.dk;
  if (name == "dv") return a.dv;
  if (name == "loss") return a.loss;
  if (name == "dqi") return a.dqi;
  if (name == "dki") return a.dki;
  throw std::logic_error("no tensor " + name);
}

// The tensor whose dtype and device define the problem of an operation: a wrong dtype there is
// reported against it only when the dtype is not a floating input dtype at all.
bool is_anchor(const OpInfo& op, const std::string& name) {
  return name == (op.op == Op::index_topk ? "qi" : "q");
}

// Asserts that `call` raises ArgumentError naming `argument`.
void expect_argument_error(const std::function<void()>& call, const std::string& argument,
                           const std::string& what) {
  try {
    call();
    ADD_FAILURE() << what << ": no error, expected ArgumentError naming '" << argument << "'";
  } catch (const ArgumentError& e) {
    EXPECT_EQ(e.argument(), argument) << what << ": " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected ArgumentError naming '" << argument << "', got "
                  << e.what();
  }
}

class Validation : public ::testing::Test {
 protected:
  Validation()
      : problem_(Config{4, 2, 8, 8, 4, 3}, {5, 3}, {9, 6}, DType::f32, 7),
        topk_(DType::i32, {2, 8, 3}),
        selected_lse_(DType::f32, {2, 8}),
        out_(DType::f32, {8, 4, 8}),
        lse_(DType::f32, {8, 4}),
        dout_(DType::f32, {8, 4, 8}),
        dq_(DType::f32, {8, 4, 8}),
        dk_(DType::f32, {15, 2, 8}),
        dv_(DType::f32, {15, 2, 8}),
        loss_(DType::f32, {1}),
        dqi_(DType::f32, {8, 2, 8}),
        dki_(DType::f32, {15, 8}) {
    for (int64_t i = 0; i < topk_.numel(); ++i) topk_.set(i, -1);
    a_.cfg = problem_.cfg;
    a_.varlen = problem_.varlen;
    a_.q = problem_.q.view();
    a_.k = problem_.k.view();
    a_.v = problem_.v.view();
    a_.qi = problem_.qi.view();
    a_.ki = problem_.ki.view();
    a_.topk = topk_.view();
    a_.selected_lse = selected_lse_.view();
    a_.out = out_.view();
    a_.lse = lse_.view();
    a_.dout = dout_.view();
    a_.dq = dq_.view();
    a_.dk = dk_.view();
    a_.dv = dv_.view();
    a_.loss = loss_.view();
    a_.dqi = dqi_.view();
    a_.dki = dki_.view();
  }

  // Runs `mutate` on a copy of the valid arguments and expects every listed operation to reject it.
  void expect_all(const std::function<void(Args&)>& mutate, const std::string& argument,
                  const std::string& what, const std::vector<Op>& only = {}) {
    for (const OpInfo& op : operations()) {
      if (!only.empty() && std::find(only.begin(), only.end(), op.op) == only.end()) continue;
      Args a = a_;
      mutate(a);
      expect_argument_error([&] { op.call(a); }, argument, std::string(op.name) + ", " + what);
    }
  }

  TestProblem problem_;
  HostTensor topk_, selected_lse_, out_, lse_, dout_, dq_, dk_, dv_, loss_, dqi_, dki_;
  Args a_;
};

TEST_F(Validation, WrongShapeNamesTheTensor) {
  for (const OpInfo& op : operations())
    for (const std::string& name : op.tensors) {
      Args a = a_;
      TensorView& t = tensor(a, name);
      t.shape[t.ndim - 1] += 1;  // innermost size: never absorbed by the length checks
      expect_argument_error([&] { op.call(a); }, name, std::string(op.name) + ", shape of " + name);
      Args b = a_;
      TensorView& u = tensor(b, name);
      u.ndim -= 1;
      expect_argument_error([&] { op.call(b); }, name, std::string(op.name) + ", rank of " + name);
    }
}

TEST_F(Validation, WrongDtypeNamesTheTensor) {
  for (const OpInfo& op : operations())
    for (const std::string& name : op.tensors) {
      Args a = a_;
      TensorView& t = tensor(a, name);
      // A float tensor given as another float dtype, the anchor and topk as something else entirely.
      t.dtype = name == "topk" ? DType::f32 : is_anchor(op, name) ? DType::i32 : DType::f16;
      expect_argument_error([&] { op.call(a); }, name, std::string(op.name) + ", dtype of " + name);
    }
  expect_all([](Args& a) { a.selected_lse.dtype = DType::f16; }, "selected_lse", "selected_lse dtype",
             {Op::index_topk});
  expect_all([](Args& a) { a.topk.dtype = DType::f32; }, "topk", "optional topk dtype",
             {Op::kl_alignment});
}

TEST_F(Validation, StatsOfF64InputsMustBeF64) {
  TestProblem p(a_.cfg, {5, 3}, {9, 6}, DType::f64, 8);
  HostTensor out(DType::f64, {8, 4, 8}), lse(DType::f32, {8, 4});
  expect_argument_error(
      [&] {
        dense_attention_forward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), out.view(),
                                lse.view());
      },
      "lse", "f32 lse for f64 inputs");
}

TEST_F(Validation, InnermostStrideMustBeOne) {
  for (const OpInfo& op : operations())
    for (const std::string& name : op.tensors) {
      Args a = a_;
      TensorView& t = tensor(a, name);
      t.stride[t.ndim - 1] = 2;
      expect_argument_error([&] { op.call(a); }, name, std::string(op.name) + ", stride of " + name);
    }
}

// A written tensor whose indices share addresses (a stride of 0, as a broadcast view has) would be
// written by several threads in turn: rejected, naming it. The same tensors permuted with room to
// spare (a padded outer stride) are accepted.
TEST_F(Validation, OverlappingOutputsAreRejected) {
  const std::map<std::string, std::vector<std::string>> writes = {
      {"index_topk", {"topk"}},
      {"sparse_attention_forward", {"out", "lse"}},
      {"sparse_attention_backward", {"dq", "dk", "dv"}},
      {"kl_alignment", {"dqi", "dki"}},
      {"dense_attention_forward", {"out", "lse"}},
      {"dense_attention_backward", {"dq", "dk", "dv"}},
  };
  int checked = 0;
  for (const OpInfo& op : operations())
    for (const std::string& name : writes.at(op.name)) {
      Args a = a_;
      TensorView& t = tensor(a, name);
      ASSERT_GT(t.shape[0], 1) << name;
      t.stride[0] = 0;
      expect_argument_error([&] { op.call(a); }, name, std::string(op.name) + ", stride 0 in " + name);
      t.stride[0] = t.ndim > 1 ? t.stride[1] : 0;  // rows overlapping the next row's elements
      if (t.ndim > 1 && t.shape[1] > 1)
        expect_argument_error([&] { op.call(a); }, name, std::string(op.name) + ", overlapping rows of " + name);
      ++checked;
    }
  EXPECT_EQ(checked, 13);
}

TEST_F(Validation, NegativeOuterStrideIsRejected) {
  expect_all([](Args& a) { a.v.stride[0] = -a.v.stride[0]; }, "v", "negative stride",
             {Op::sparse_forward, Op::dense_forward});
}

TEST_F(Validation, DeviceMismatchNamesTheTensor) {
  for (const OpInfo& op : operations())
    for (const std::string& name : op.tensors) {
      if (is_anchor(op, name)) continue;  // the anchor sets the device: see the next test
      Args a = a_;
      tensor(a, name).device = Device::cuda(0);
      expect_argument_error([&] { op.call(a); }, name, std::string(op.name) + ", device of " + name);
    }
}

TEST_F(Validation, AnchorOnAnotherDeviceThanCuSeqlens) {
  expect_all(
      [](Args& a) {
        a.q.device = Device::cuda(0);
        a.qi.device = Device::cuda(0);
      },
      "cu_seqlens_q", "q/qi on cuda, cu_seqlens on cpu");
}

TEST_F(Validation, NullRequiredPointerNamesTheTensor) {
  for (const OpInfo& op : operations())
    for (const std::string& name : op.tensors) {
      Args a = a_;
      tensor(a, name).data = nullptr;
      expect_argument_error([&] { op.call(a); }, name, std::string(op.name) + ", null " + name);
    }
  expect_all([](Args& a) { a.varlen.cu_seqlens_q.data = nullptr; }, "cu_seqlens_q", "null cu_seqlens_q");
  expect_all([](Args& a) { a.varlen.cu_seqlens_k.data = nullptr; }, "cu_seqlens_k", "null cu_seqlens_k");
}

// cu_seqlens contents: a varlen whose host arrays a test may edit freely.
class CuSeqlens : public Validation {
 protected:
  void expect_lengths(std::vector<int32_t> cu_q, std::vector<int32_t> cu_k, const std::string& argument,
                      const std::string& what) {
    HostTensor tq(DType::i32, {int64_t(cu_q.size())}), tk(DType::i32, {int64_t(cu_k.size())});
    for (size_t i = 0; i < cu_q.size(); ++i) tq.set(int64_t(i), cu_q[i]);
    for (size_t i = 0; i < cu_k.size(); ++i) tk.set(int64_t(i), cu_k[i]);
    expect_all(
        [&](Args& a) {
          a.varlen.cu_seqlens_q = tq.view();
          a.varlen.cu_seqlens_k = tk.view();
        },
        argument, what);
  }
};

TEST_F(CuSeqlens, MustStartAtZero) {
  expect_lengths({1, 5, 8}, {0, 9, 15}, "cu_seqlens_q", "cu_seqlens_q[0] = 1");
  expect_lengths({0, 5, 8}, {2, 9, 15}, "cu_seqlens_k", "cu_seqlens_k[0] = 2");
}

TEST_F(CuSeqlens, MustNotDecrease) {
  // Ends at the right totals, but goes down on the way (sequence 1 would have negative length).
  expect_lengths({0, 9, 8}, {0, 9, 15}, "cu_seqlens_q", "decreasing cu_seqlens_q");
  expect_lengths({0, 5, 8}, {0, 16, 15}, "cu_seqlens_k", "decreasing cu_seqlens_k");
}

TEST_F(CuSeqlens, LastEntryMustEqualTheTotal) {
  expect_lengths({0, 5, 7}, {0, 9, 15}, "cu_seqlens_q", "cu_seqlens_q ends at 7, total_q 8");
  expect_lengths({0, 5, 8}, {0, 9, 14}, "cu_seqlens_k", "cu_seqlens_k ends at 14, total_k 15");
}

TEST_F(CuSeqlens, KeysMustCoverTheQueries) {
  // Sequence 1: 3 queries, 2 keys... then sequence 0 has 13 keys (total stays 15).
  expect_lengths({0, 5, 8}, {0, 13, 15}, "cu_seqlens_k", "Lk < Lq");
}

TEST_F(CuSeqlens, BatchSizesMustAgree) {
  expect_lengths({0, 5, 8}, {0, 9, 12, 15}, "cu_seqlens_k", "3 key sequences, 2 query sequences");
}

TEST_F(CuSeqlens, NeedsAtLeastOneSequence) {
  expect_lengths({0}, {0}, "cu_seqlens_q", "batch 0");
}

TEST_F(CuSeqlens, MustBeInt32OnOneDimension) {
  expect_all([](Args& a) { a.varlen.cu_seqlens_q.dtype = DType::f32; }, "cu_seqlens_q", "f32 cu_seqlens_q");
  expect_all([](Args& a) { a.varlen.cu_seqlens_k.dtype = DType::f32; }, "cu_seqlens_k", "f32 cu_seqlens_k");
  expect_all([](Args& a) { a.varlen.cu_seqlens_k.ndim = 2; }, "cu_seqlens_k", "2-d cu_seqlens_k");
  expect_all([](Args& a) { a.varlen.cu_seqlens_q.stride[0] = 2; }, "cu_seqlens_q", "strided cu_seqlens_q");
  expect_all([](Args& a) { a.varlen.cu_seqlens_k.device = Device::cuda(0); }, "cu_seqlens_k",
             "cu_seqlens_k on cuda");
}

TEST_F(Validation, MaxSeqlenMustBoundTheLengths) {
  expect_all([](Args& a) { a.varlen.max_seqlen_q = 4; }, "max_seqlen_q", "max_seqlen_q 4 < 5");
  expect_all([](Args& a) { a.varlen.max_seqlen_k = 8; }, "max_seqlen_k", "max_seqlen_k 8 < 9");
  expect_all([](Args& a) { a.varlen.max_seqlen_q = -1; }, "max_seqlen_q", "negative max_seqlen_q");
  expect_all([](Args& a) { a.varlen.max_seqlen_k = -1; }, "max_seqlen_k", "negative max_seqlen_k");
}

TEST_F(Validation, BadConfigurationNamesTheField) {
  expect_all([](Args& a) { a.cfg.num_q_heads = 3; }, "num_q_heads", "Hq % Hkv != 0");
  expect_all([](Args& a) { a.cfg.num_kv_heads = 0; }, "num_kv_heads", "Hkv = 0");
  expect_all([](Args& a) { a.cfg.num_q_heads = -4; }, "num_q_heads", "negative Hq");
  expect_all([](Args& a) { a.cfg.topk = 0; }, "topk", "topk 0");
  expect_all([](Args& a) { a.cfg.topk = -2; }, "topk", "topk -2");
  expect_all([](Args& a) { a.cfg.block_size = 0; }, "block_size", "block_size 0");
  expect_all([](Args& a) { a.cfg.head_dim = 0; }, "head_dim", "head_dim 0");
  expect_all([](Args& a) { a.cfg.index_head_dim = 257; }, "index_head_dim", "index_head_dim 257");
  expect_all([](Args& a) { a.cfg.scale = -1.f; }, "scale", "negative scale");
  expect_all([](Args& a) { a.cfg.scale = std::numeric_limits<float>::quiet_NaN(); }, "scale", "NaN scale");
  expect_all([](Args& a) { a.cfg.index_scale = std::numeric_limits<float>::infinity(); }, "index_scale",
             "infinite index_scale");
}

TEST_F(Validation, BadTemperature) {
  for (float t : {0.f, -1.f, std::numeric_limits<float>::quiet_NaN(),
                  std::numeric_limits<float>::infinity()})
    expect_all([t](Args& a) { a.temperature = t; }, "temperature",
               "temperature " + std::to_string(t), {Op::index_topk});
}

TEST_F(Validation, BadCoefficient) {
  for (float c : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
    expect_all([c](Args& a) { a.coeff = c; }, "coeff", "coeff " + std::to_string(c),
               {Op::kl_alignment});
}

TEST_F(Validation, TooSmallWorkspace) {
  int checked = 0;
  for (const OpInfo& op : operations()) {
    const std::size_t need = workspace_bytes(op.op, a_.cfg, a_.varlen, 8, 15, Device::cpu());
    if (need == 0) continue;  // nothing to be short of
    std::vector<unsigned char> scratch(need);
    Args a = a_;
    a.ctx.workspace = {scratch.data(), need - 1};
    expect_argument_error([&] { op.call(a); }, "workspace", std::string(op.name) + ", workspace");
    ++checked;
  }
  if (checked == 0) GTEST_SKIP() << "no CPU operation needs a workspace for this problem";
}

TEST_F(Validation, WorkspaceBytesValidatesItsArguments) {
  Config bad = a_.cfg;
  bad.num_q_heads = 5;
  expect_argument_error(
      [&] { workspace_bytes(Op::sparse_forward, bad, a_.varlen, 8, 15, Device::cpu()); },
      "num_q_heads", "workspace_bytes with Hq % Hkv != 0");
  expect_argument_error(
      [&] { workspace_bytes(Op::sparse_forward, a_.cfg, a_.varlen, 7, 15, Device::cpu()); },
      "cu_seqlens_q", "workspace_bytes with the wrong total_q");
}

TEST_F(Validation, OptionalOutputsMayBeUndefined) {
  // selected_lse (index_topk) and topk (kl_alignment: dense warmup) are optional: leaving them out
  // must not be reported as an argument error.
  Args a = a_;
  a.selected_lse = TensorView{};
  a.topk = TensorView{};
  for (Op id : {Op::index_topk, Op::kl_alignment}) {
    if (id == Op::index_topk) a.topk = topk_.view();
    else a.topk = TensorView{};
    for (const OpInfo& op : operations())
      if (op.op == id) {
        try {
          op.call(a);
        } catch (const ArgumentError& e) {
          ADD_FAILURE() << op.name << ": " << e.what();
        } catch (const std::exception&) {
          // A backend still being written may throw something else; validation passed.
        }
      }
  }
}

TEST_F(Validation, CudaBackendRejectsF64) {
  // f64 is a CPU-only dtype (gradient checks); the rule is checked before any device is touched.
  TestProblem p(a_.cfg, {5, 3}, {9, 6}, DType::f64, 9);
  Varlen varlen = p.varlen;
  varlen.cu_seqlens_q.device = varlen.cu_seqlens_k.device = Device::cuda(0);
  varlen.host_cu_seqlens_q = p.lens.cu_q.data();
  varlen.host_cu_seqlens_k = p.lens.cu_k.data();
  HostTensor out(DType::f64, {8, 4, 8}), lse(DType::f64, {8, 4}), topk(DType::i32, {2, 8, 3});
  expect_argument_error(
      [&] {
        dense_attention_forward(p.cfg, varlen, p.q.view(Device::cuda(0)), p.k.view(Device::cuda(0)),
                                p.v.view(Device::cuda(0)), out.view(Device::cuda(0)),
                                lse.view(Device::cuda(0)));
      },
      "q", "f64 q on cuda");
  expect_argument_error(
      [&] {
        index_topk(p.cfg, varlen, p.qi.view(Device::cuda(0)), p.ki.view(Device::cuda(0)),
                   topk.view(Device::cuda(0)), TensorView{});
      },
      "qi", "f64 qi on cuda");
}

#if !defined(MSA_WITH_CUDA)
TEST_F(Validation, BuildWithoutCudaRaisesNotSupportedForCudaTensors) {
  // Every tensor consistently on cuda:0 (host memory, never read): valid input, missing backend.
  Args a = a_;
  for (const char* name : {"q", "k", "v", "qi", "ki", "topk", "selected_lse", "out", "lse", "dout",
                           "dq", "dk", "dv", "loss", "dqi", "dki"})
    tensor(a, name).device = Device::cuda(0);
  a.varlen.cu_seqlens_q.device = a.varlen.cu_seqlens_k.device = Device::cuda(0);
  a.varlen.host_cu_seqlens_q = problem_.lens.cu_q.data();
  a.varlen.host_cu_seqlens_k = problem_.lens.cu_k.data();
  for (const OpInfo& op : operations())
    EXPECT_THROW(op.call(a), NotSupportedError) << op.name;
  EXPECT_THROW(workspace_bytes(Op::index_topk, a.cfg, a.varlen, 8, 15, Device::cuda(0)),
               NotSupportedError);
  EXPECT_FALSE(cuda_available());
  EXPECT_EQ(cuda_device_count(), 0);
}
#endif

}  // namespace
}  // namespace msa
