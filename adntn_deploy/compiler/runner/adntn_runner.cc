// adntn-runner: run a compiled adntn artifact (TVM Relax VM executable) on a CPU with only the TVM runtime.
//
// Usage: adntn-runner ARTIFACT_DIR INPUTS.safetensors OUTPUTS.safetensors [--repeat N] [--threads N]
//
// ARTIFACT_DIR holds manifest.json, the exported library (model.so) and the params file (safetensors).
// When manifest "weights" is "load" or "stream": main_transform_params(params) runs once, then main(inputs..., *transformed).
// When it is "fold": main(inputs...). Outputs are written keyed by the manifest output names, and one line
// with the mean wall-clock latency of main over N calls is printed. Any error: one line on stderr, exit 1.
// --threads N sizes TVM's CPU thread pool; the default is TVM_NUM_THREADS when set, else every CPU this process
// may use (TVM's own default on x86 is half of them, assuming two hyper-threads per core).
// Depends only on libtvm_runtime + libtvm_ffi (link with -Wl,--no-as-needed so the VM loader is kept).
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sched.h>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void Fail(const std::string& msg) { throw Failure(msg); }

// ---- dtypes: safetensors code <-> manifest name <-> DLDataType ----
struct DTypeInfo {
  const char* st;    // safetensors code
  const char* name;  // manifest / numpy name
  DLDataType dl;
};
const DTypeInfo kDTypes[] = {
    {"F32", "float32", {kDLFloat, 32, 1}}, {"F64", "float64", {kDLFloat, 64, 1}},
    {"F16", "float16", {kDLFloat, 16, 1}}, {"I64", "int64", {kDLInt, 64, 1}},
    {"I32", "int32", {kDLInt, 32, 1}},     {"I8", "int8", {kDLInt, 8, 1}},
    {"U8", "uint8", {kDLUInt, 8, 1}},      {"BOOL", "bool", {kDLBool, 8, 1}},
};
bool SameDL(DLDataType a, DLDataType b) { return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes; }
const DTypeInfo& FromST(const std::string& s, const std::string& where) {
  for (const auto& d : kDTypes) if (s == d.st) return d;
  Fail(where + ": unsupported safetensors dtype '" + s + "' (supported: F32, F64, F16, I64, I32, I8, U8, BOOL)");
}
const DTypeInfo& FromName(const std::string& s, const std::string& where) {
  for (const auto& d : kDTypes) if (s == d.name) return d;
  Fail(where + ": unsupported dtype '" + s + "'");
}
const DTypeInfo& FromDL(DLDataType t, const std::string& where) {
  for (const auto& d : kDTypes) if (SameDL(t, d.dl)) return d;
  Fail(where + ": the model returned a tensor of an unsupported dtype");
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// ---- small JSON accessors over tvm::ffi::json (Map<Any, Any> / Array<Any>) ----
json::Object AsObject(const ffi::Any& v, const std::string& where) {
  auto o = v.try_cast<json::Object>();
  if (!o) Fail(where + ": expected a JSON object");
  return *o;
}
bool Has(const json::Object& o, const char* key) { return o.count(ffi::String(key)) != 0; }
ffi::Any Field(const json::Object& o, const char* key, const std::string& where) {
  if (!Has(o, key)) Fail(where + ": missing key \"" + key + "\"");
  return o.at(ffi::String(key));
}
std::string Str(const ffi::Any& v, const std::string& where) {
  auto s = v.try_cast<ffi::String>();
  if (!s) Fail(where + ": expected a string");
  return std::string(*s);
}
json::Array Arr(const ffi::Any& v, const std::string& where) {
  auto a = v.try_cast<json::Array>();
  if (!a) Fail(where + ": expected a list");
  return *a;
}
int64_t Int(const ffi::Any& v, const std::string& where) {
  if (auto i = v.as<int64_t>()) return *i;
  if (auto d = v.as<double>()) if (*d == static_cast<double>(static_cast<int64_t>(*d))) return static_cast<int64_t>(*d);
  Fail(where + ": expected an integer");
}
std::vector<int64_t> IntList(const ffi::Any& v, const std::string& where) {
  std::vector<int64_t> r;
  for (const ffi::Any& x : Arr(v, where)) r.push_back(Int(x, where));
  return r;
}

std::string ReadFile(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot open " + std::string(what) + " '" + path + "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
json::Value ParseJSON(const std::string& text, const std::string& where) {
  ffi::String err;
  json::Value v = json::Parse(ffi::String(text), &err);
  if (!err.empty()) Fail(where + ": invalid JSON (" + std::string(err) + ")");
  return v;
}

// ---- CPU tensors (64-byte aligned, as TVM kernels expect) ----
struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n ? n : 64);
    if (!t->data) Fail("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};
ffi::Tensor NewTensor(const std::vector<int64_t>& shape, DLDataType dt) {
  return ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), dt,
                                  DLDevice{kDLCPU, 0});
}

// ---- safetensors: u64 LE header length, JSON header {name: {dtype, shape, data_offsets}}, raw data ----
struct NamedTensor {
  std::string name;
  ffi::Tensor tensor;
};

std::vector<NamedTensor> ReadSafetensors(const std::string& path, const char* what) {
  std::string buf = ReadFile(path, what);
  const std::string where = std::string(what) + " '" + path + "'";
  if (buf.size() < 8) Fail(where + ": not a safetensors file (shorter than 8 bytes)");
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | static_cast<unsigned char>(buf[i]);
  if (hlen > buf.size() - 8) Fail(where + ": not a safetensors file (bad header length)");
  json::Object header = AsObject(ParseJSON(buf.substr(8, hlen), where), where);
  const size_t base = 8 + hlen, data_len = buf.size() - base;
  std::vector<NamedTensor> out;
  for (const auto& kv : header) {
    std::string name = Str(kv.first, where);
    if (name == "__metadata__") continue;
    std::string w = where + " tensor '" + name + "'";
    json::Object info = AsObject(kv.second, w);
    const DTypeInfo& dt = FromST(Str(Field(info, "dtype", w), w), w);
    std::vector<int64_t> shape = IntList(Field(info, "shape", w), w);
    std::vector<int64_t> off = IntList(Field(info, "data_offsets", w), w);
    ffi::Tensor t = NewTensor(shape, dt.dl);
    size_t nbytes = ffi::GetDataSize(*t.GetDLTensorPtr());
    if (off.size() != 2 || off[0] < 0 || off[1] < off[0] || static_cast<uint64_t>(off[1]) > data_len ||
        static_cast<size_t>(off[1] - off[0]) != nbytes)
      Fail(w + ": data_offsets do not match shape " + ShapeStr(shape) + " and dtype " + dt.st);
    if (nbytes) std::memcpy(t.data_ptr(), buf.data() + base + off[0], nbytes);
    out.push_back({name, t});
  }
  return out;
}

const ffi::Tensor* Find(const std::vector<NamedTensor>& ts, const std::string& name) {
  for (const auto& t : ts) if (t.name == name) return &t.tensor;
  return nullptr;
}

void WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& ts) {
  std::string header = "{";
  size_t offset = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const DLTensor* t = ts[i].tensor.GetDLTensorPtr();
    size_t n = ffi::GetDataSize(*t);
    std::vector<int64_t> shape(t->shape, t->shape + t->ndim);
    header += (i ? "," : "") + std::string("\"") + ts[i].name + "\":{\"dtype\":\"" +
              FromDL(t->dtype, "output '" + ts[i].name + "'").st + "\",\"shape\":" + ShapeStr(shape) +
              ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + n) + "]}";
    offset += n;
  }
  header += "}";
  while (header.size() % 8) header += ' ';  // the format pads the header with spaces to 8-byte alignment
  std::ofstream f(path, std::ios::binary);
  if (!f) Fail("cannot write outputs file '" + path + "'");
  uint64_t hlen = header.size();
  for (int i = 0; i < 8; ++i) f.put(static_cast<char>((hlen >> (8 * i)) & 0xff));
  f << header;
  for (const auto& nt : ts) {
    const DLTensor* t = nt.tensor.GetDLTensorPtr();
    if (!ffi::IsContiguous(*t)) Fail("output '" + nt.name + "' is not contiguous");
    f.write(static_cast<const char*>(t->data) + t->byte_offset, ffi::GetDataSize(*t));
  }
  if (!f) Fail("error while writing outputs file '" + path + "'");
}

// Check that the library is an ELF shared object for the machine this runner was built for (dlopen's own
// message for a foreign architecture is a misleading "No such file or directory").
void CheckLibrary(const std::string& lib) {
  std::ifstream f(lib, std::ios::binary);
  if (!f) Fail("cannot open model library '" + lib + "'");
  unsigned char h[20] = {0};
  f.read(reinterpret_cast<char*>(h), sizeof(h));
  if (f.gcount() < 20 || std::memcmp(h, "\x7f" "ELF", 4) != 0) Fail("'" + lib + "' is not an ELF shared library");
  const unsigned machine = h[18] | (h[19] << 8);  // e_machine, little-endian
#if defined(__aarch64__)
  const unsigned expected = 183; const char* arch = "aarch64";
#elif defined(__x86_64__)
  const unsigned expected = 62; const char* arch = "x86_64";
#elif defined(__arm__)
  const unsigned expected = 40; const char* arch = "armv7";
#elif defined(__riscv)
  const unsigned expected = 243; const char* arch = "riscv64";
#else
  const unsigned expected = machine; const char* arch = "this machine";
#endif
  if (machine != expected)
    Fail("'" + lib + "' was compiled for another architecture (ELF machine " + std::to_string(machine) +
         "), this runner is for " + arch + ": recompile the model for this target");
}

ffi::Function GetFunc(const ffi::Module& m, const char* name, const std::string& where) {
  ffi::Optional<ffi::Function> f = m->GetFunction(ffi::String(name), false);
  if (!f.has_value()) Fail(where + " has no function '" + name + "'");
  return *f;
}

int Run(int argc, char** argv) {
  std::vector<std::string> pos;
  long repeat = 1;
  long threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--repeat" || a == "--threads") {
      if (i + 1 >= argc) Fail(a + " needs a value");
      char* end = nullptr;
      long value = std::strtol(argv[++i], &end, 10);
      if (*end || value < 1) Fail(a + " must be a positive integer, got '" + std::string(argv[i]) + "'");
      (a == "--repeat" ? repeat : threads) = value;
    } else if (a == "-h" || a == "--help") {
      std::cout << "usage: adntn-runner ARTIFACT_DIR INPUTS.safetensors OUTPUTS.safetensors [--repeat N] [--threads N]\n";
      return 0;
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 3) Fail("usage: adntn-runner ARTIFACT_DIR INPUTS.safetensors OUTPUTS.safetensors [--repeat N] [--threads N]");
  const std::string dir = pos[0];
  // The thread pool reads TVM_NUM_THREADS when it first runs a parallel loop, which is after this point.
  if (threads > 0) {
    setenv("TVM_NUM_THREADS", std::to_string(threads).c_str(), 1);
  } else if (std::getenv("TVM_NUM_THREADS") == nullptr) {
    cpu_set_t usable;
    int cpus = sched_getaffinity(0, sizeof(usable), &usable) == 0 ? CPU_COUNT(&usable) : 0;
    if (cpus > 0) setenv("TVM_NUM_THREADS", std::to_string(cpus).c_str(), 1);
  }

  // Manifest.
  const std::string mpath = dir + "/manifest.json";
  json::Object man = AsObject(ParseJSON(ReadFile(mpath, "manifest"), mpath), mpath);
  if (Has(man, "format") && Str(man.at(ffi::String("format")), mpath) != "adntn-artifact")
    Fail(mpath + ": \"format\" is not \"adntn-artifact\"");
  if (Has(man, "version") && Int(man.at(ffi::String("version")), mpath) != 1)
    Fail(mpath + ": unsupported \"version\" (this runner reads version 1)");
  std::string library = Has(man, "library") ? Str(man.at(ffi::String("library")), mpath) : "model.so";
  std::string weights = Has(man, "weights") ? Str(man.at(ffi::String("weights")), mpath) : "load";
  if (weights != "load" && weights != "fold" && weights != "stream")
    Fail(mpath + ": \"weights\" must be \"load\", \"stream\" or \"fold\"");
  const bool transform = weights != "fold";  // load and stream both run main_transform_params once
  std::vector<std::string> param_names;
  if (Has(man, "params"))
    for (const ffi::Any& p : Arr(man.at(ffi::String("params")), mpath + " \"params\"")) param_names.push_back(Str(p, mpath));
  auto io_specs = [&](const char* key) {
    std::vector<std::pair<std::string, json::Object>> r;
    for (const ffi::Any& e : Arr(Field(man, key, mpath), mpath + " \"" + key + "\"")) {
      json::Object o = AsObject(e, mpath + " \"" + key + "\" entry");
      r.emplace_back(Str(Field(o, "name", mpath + " " + key), mpath), o);
    }
    return r;
  };
  auto in_specs = io_specs("inputs");
  auto out_specs = io_specs("outputs");

  // Inputs: every manifest input must be present with exactly its shape and dtype.
  std::vector<NamedTensor> inputs = ReadSafetensors(pos[1], "inputs file");
  std::vector<ffi::Tensor> in_tensors;
  for (const auto& [name, spec] : in_specs) {
    const ffi::Tensor* t = Find(inputs, name);
    if (!t) Fail("inputs file '" + pos[1] + "' has no tensor '" + name + "' (the manifest's input)");
    std::string w = "input '" + name + "'";
    std::vector<int64_t> want = IntList(Field(spec, "shape", mpath + " " + w), mpath + " " + w);
    const DTypeInfo& wdt = FromName(Str(Field(spec, "dtype", mpath + " " + w), mpath), mpath + " " + w);
    ffi::ShapeView s = t->shape();
    std::vector<int64_t> got(s.begin(), s.end());
    if (got != want) Fail(w + ": shape " + ShapeStr(got) + " does not match the manifest's " + ShapeStr(want));
    if (!SameDL(t->dtype(), wdt.dl))
      Fail(w + ": dtype " + FromDL(t->dtype(), w).name + " does not match the manifest's " + wdt.name);
    in_tensors.push_back(*t);
  }

  // Params.
  std::vector<NamedTensor> params;
  ffi::Array<ffi::Any> param_tuple;
  if (transform) {
    std::string pfile = Has(man, "params_file") ? Str(man.at(ffi::String("params_file")), mpath) : "params.safetensors";
    params = ReadSafetensors(dir + "/" + pfile, "params file");
    for (const auto& n : param_names) {
      const ffi::Tensor* t = Find(params, n);
      if (!t) Fail("params file '" + dir + "/" + pfile + "' has no tensor '" + n + "' (listed in the manifest)");
      param_tuple.push_back(*t);
    }
  }

  // Load the executable and create the Relax VM on the CPU (device type kDLCPU, id 0, pooled allocator = 2).
  const std::string lib = dir + "/" + library;
  CheckLibrary(lib);
  ffi::Module exec = ffi::Module::LoadFromFile(ffi::String(lib));
  ffi::Module vm = GetFunc(exec, "vm_load_executable", lib)().cast<ffi::Module>();
  GetFunc(vm, "vm_initialization", lib)(static_cast<int>(kDLCPU), 0, 2);

  std::vector<ffi::Any> transformed;
  if (transform) {
    ffi::Any r = GetFunc(vm, "main_transform_params", lib)(param_tuple);
    for (const ffi::Any& x : r.cast<ffi::Array<ffi::Any>>()) transformed.push_back(x);
  }
  std::vector<ffi::AnyView> args;
  for (const auto& t : in_tensors) args.emplace_back(t);
  for (const auto& t : transformed) args.emplace_back(t);

  ffi::Function main_fn = GetFunc(vm, "main", lib);
  ffi::Any result;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < repeat; ++i) main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  auto t1 = std::chrono::steady_clock::now();
  double mean_ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / repeat;

  std::vector<ffi::Tensor> outs;
  if (auto t = result.try_cast<ffi::Tensor>()) {
    outs.push_back(*t);
  } else if (auto a = result.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& x : *a) {
      auto xt = x.try_cast<ffi::Tensor>();
      if (!xt) Fail("main returned a non-tensor output (" + x.GetTypeKey() + ")");
      outs.push_back(*xt);
    }
  } else {
    Fail("main returned " + result.GetTypeKey() + ", expected a tensor or a tuple of tensors");
  }
  if (outs.size() != out_specs.size())
    Fail("main returned " + std::to_string(outs.size()) + " outputs, the manifest lists " + std::to_string(out_specs.size()));
  std::vector<NamedTensor> named;
  for (size_t i = 0; i < outs.size(); ++i) named.push_back({out_specs[i].first, outs[i]});
  WriteSafetensors(pos[2], named);
  long pool = 0;  // what TVM's thread pool reports, not what was asked for
  if (ffi::Optional<ffi::Function> num_threads = ffi::Function::GetGlobal("runtime.NumThreads"))
    pool = (*num_threads)().cast<int64_t>();
  std::printf("mean latency of main: %.4f ms over %ld run(s) on %ld thread(s)\n", mean_ms, repeat, pool);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const Failure& e) {
    std::fprintf(stderr, "adntn-runner: error: %s\n", e.what());
  } catch (const ffi::Error& e) {
    std::string msg = e.message();  // may span lines: keep the report on one line
    for (char& c : msg) if (c == '\n') c = ' ';
    std::fprintf(stderr, "adntn-runner: error: TVM %s: %s\n", e.kind().c_str(), msg.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "adntn-runner: error: %s\n", e.what());
  }
  return 1;
}
