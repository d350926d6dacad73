// adntn-runner: run a compiled adntn artifact (TVM Relax VM executable) on a CPU with only the TVM runtime.
//
// Usage: adntn-runner ARTIFACT_DIR INPUTS.safetensors OUTPUTS.safetensors [--repeat N] [--threads N]
//
// ARTIFACT_DIR holds manifest.json, the exported library (model.so) and the params file (safetensors).
// When manifest "weights" is "load" or "stream": main_transform_params(params) runs once, then main(inputs..., *transformed).
// When it is "fold": main(inputs...). Outputs are written keyed by the manifest output names; one line says
// the memory the weights took while loading and after (Linux), one the mean wall-clock latency of main over N
// calls. Any error: one line on stderr, exit 1.
// --threads N sizes TVM's CPU thread pool; the default is TVM_NUM_THREADS when set, else every CPU this process
// may use (TVM's own default on x86 is half of them, assuming two hyper-threads per core). Where those CPUs are
// alike, TVM's workers are not pinned to cores (TVM_BIND_THREADS=0) unless TVM_BIND_THREADS is set.
// Depends only on libtvm_runtime + libtvm_ffi (link with -Wl,--no-as-needed so the VM loader is kept).
// The library and params file must be plain names listed in the manifest's "files" with their sha256, which
// is checked before use (it detects accidents, it does not authenticate the publisher: SECURITY.md).
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
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
// tvm::ffi::json::Parse recurses once per nesting level, so 100,000 '[' would overflow the stack: bound the
// depth first, counting brackets outside strings (no file we write nests more than a few levels).
constexpr int kMaxJSONDepth = 64;
void CheckJSONDepth(const std::string& text, const std::string& where) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJSONDepth)
        Fail(where + ": JSON nested deeper than " + std::to_string(kMaxJSONDepth) + " levels; not a file adntn-deploy wrote");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}
json::Value ParseJSON(const std::string& text, const std::string& where) {
  CheckJSONDepth(text, where);
  ffi::String err;
  json::Value v = json::Parse(ffi::String(text), &err);
  if (!err.empty()) Fail(where + ": invalid JSON (" + std::string(err) + ")");
  return v;
}

// ---- SHA-256 (FIPS 180-4), to check the files against the manifest's hashes ----
// Incremental, so a file is hashed as it is read: holding a whole params file to hash it doubled the load peak.
class Sha256 {
 public:
  void Update(const char* data, size_t n) {
    total_ += n;
    while (n > 0) {
      const size_t take = std::min(n, sizeof(buf_) - used_);
      std::memcpy(buf_ + used_, data, take);
      used_ += take; data += take; n -= take;
      if (used_ == sizeof(buf_)) { Block(buf_); used_ = 0; }
    }
  }
  std::string HexDigest() {  // finishes the hash: call once
    const uint64_t bits = total_ * 8;
    const char one = static_cast<char>(0x80), zero = 0;
    Update(&one, 1);
    while (used_ != 56) Update(&zero, 1);
    char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((bits >> (8 * (7 - i))) & 0xff);
    Update(len, 8);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t v : h_)
      for (int i = 7; i >= 0; --i) out.push_back(hex[(v >> (4 * i)) & 0xf]);
    return out;
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void Block(const unsigned char* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) | (uint32_t(p[4 * i + 2]) << 8) | uint32_t(p[4 * i + 3]);
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], hh = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h_[0] += a; h_[1] += b; h_[2] += c; h_[3] += d; h_[4] += e; h_[5] += f; h_[6] += g; h_[7] += hh;
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buf_[64] = {0};
  size_t used_ = 0;
  uint64_t total_ = 0;
};

// A file's sha256, read in chunks of 1 MiB.
std::string FileSha256(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot open " + std::string(what) + " '" + path + "'");
  Sha256 hash;
  std::vector<char> chunk(1 << 20);
  while (f) {
    f.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    hash.Update(chunk.data(), static_cast<size_t>(f.gcount()));
  }
  return hash.HexDigest();
}

// ---- artifact files: plain names inside the folder, listed and hashed in the manifest ----
std::string RealPath(const std::string& path) {
  char* r = ::realpath(path.c_str(), nullptr);
  if (!r) return "";
  std::string out(r);
  std::free(r);
  return out;
}
// dir + "/" + name for a manifest file name that stays in dir: no separators, not "." or "..", and no symlink
// leading out (the Python loader applies the same rule).
std::string ContainedFile(const std::string& dir, const std::string& name, const std::string& where) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\\') != std::string::npos || name.find('\0') != std::string::npos)
    Fail(where + ": \"" + name + "\" is not a plain file name inside the artifact; rebuild the artifact");
  const std::string path = dir + "/" + name;
  const std::string real = RealPath(path), real_dir = RealPath(dir);
  if (real.empty()) Fail("cannot open artifact file '" + path + "'");
  if (real_dir.empty() || real.size() <= real_dir.size() + 1 || real.compare(0, real_dir.size() + 1, real_dir + "/") != 0 ||
      real.find('/', real_dir.size() + 1) != std::string::npos)
    Fail(where + ": \"" + name + "\" leads outside the artifact folder; rebuild the artifact");
  return path;
}
// The sha256 the manifest's "files" records for name; every file the runner loads must be listed.
std::string ListedSha256(const json::Object& man, const std::string& name, const std::string& field,
                         const std::string& mpath) {
  json::Object files = AsObject(Field(man, "files", mpath), mpath + " \"files\"");
  if (files.count(ffi::String(name)) == 0)
    Fail(mpath + ": " + field + " \"" + name + "\" is not listed (with its sha256) in \"files\"; rebuild the artifact");
  const std::string w = mpath + " \"files\" entry \"" + name + "\"";
  return Str(Field(AsObject(files.at(ffi::String(name)), w), "sha256", w), w);
}
[[noreturn]] void FailModified(const std::string& path) {
  Fail("artifact file '" + path + "' was modified (sha256 mismatch); rebuild the artifact");
}
void CheckSha256(const std::string& path, const char* what, const std::string& want) {
  if (FileSha256(path, what) != want) FailModified(path);
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

// The tensors of a safetensors file, read straight into their aligned buffers in one pass over the file. With
// ``sha256`` the pass also hashes the file, and a mismatch (or a file that does not parse but was modified) is
// reported as a modification: nothing is held twice, so loading 16 MiB of params peaks at 16 MiB, not 48.
std::vector<NamedTensor> ReadSafetensors(const std::string& path, const char* what, const std::string* sha256 = nullptr) {
  try {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) Fail("cannot open " + std::string(what) + " '" + path + "'");
    const uint64_t size = static_cast<uint64_t>(f.tellg());
    f.seekg(0);
    const std::string where = std::string(what) + " '" + path + "'";
    Sha256 hash;
    auto read = [&](char* dst, uint64_t n) {  // the next n bytes of the file, hashed
      f.read(dst, static_cast<std::streamsize>(n));
      if (static_cast<uint64_t>(f.gcount()) != n) Fail(where + ": truncated file");
      hash.Update(dst, n);
    };
    std::vector<char> scratch(1 << 16);
    auto skip = [&](uint64_t n) {  // bytes no tensor owns (the format allows none; hashed all the same)
      while (n > 0) {
        const uint64_t take = std::min<uint64_t>(n, scratch.size());
        read(scratch.data(), take);
        n -= take;
      }
    };
    if (size < 8) Fail(where + ": not a safetensors file (shorter than 8 bytes)");
    char len[8];
    read(len, 8);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | static_cast<unsigned char>(len[i]);
    if (hlen > size - 8) Fail(where + ": not a safetensors file (bad header length)");
    std::string text(hlen, '\0');
    read(text.data(), hlen);
    json::Object header = AsObject(ParseJSON(text, where), where);
    const uint64_t data_len = size - 8 - hlen;
    struct Entry {
      std::string name;
      ffi::Tensor tensor;
      uint64_t begin;
    };
    std::vector<Entry> entries;
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
      entries.push_back({name, t, static_cast<uint64_t>(off[0])});
    }
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
    uint64_t cursor = 0;  // bytes of the data section read so far
    for (const Entry& e : entries) {
      if (e.begin < cursor) Fail(where + " tensor '" + e.name + "': its data overlaps another tensor's");
      skip(e.begin - cursor);
      const size_t nbytes = ffi::GetDataSize(*e.tensor.GetDLTensorPtr());
      read(static_cast<char*>(e.tensor.data_ptr()), nbytes);
      cursor = e.begin + nbytes;
    }
    skip(data_len - cursor);
    if (sha256 && hash.HexDigest() != *sha256) FailModified(path);
    std::vector<NamedTensor> out;
    for (Entry& e : entries) out.push_back({std::move(e.name), std::move(e.tensor)});
    return out;
  } catch (const Failure&) {
    // a modified file is reported as such, whatever part of it stopped the parse
    if (sha256 && FileSha256(path, what) != *sha256) FailModified(path);
    throw;
  }
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

// ---- memory: what the report line says, and handing freed heap back ----
// A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the peak so far); -1 where there is no such
// file (not Linux) or field.
long StatusKiB(const char* field) {
  std::ifstream f("/proc/self/status");
  const std::string key = std::string(field) + ":";
  for (std::string line; std::getline(f, line);)
    if (line.compare(0, key.size(), key) == 0) return std::strtol(line.c_str() + key.size(), nullptr, 10);
  return -1;
}
// glibc keeps freed blocks of up to 32 MiB on its heap (its mmap threshold grows after each large free), so the
// params freed after the transform would stay resident; malloc_trim returns them. Other C libraries: nothing.
void ReturnFreedHeap() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

// Whether every CPU in `usable` has the same top frequency (what TVM tells big cores from little ones by); a CPU
// without cpufreq counts as like the others (VMs and containers show none). Mirrors the Python predictor.
bool IdenticalCores(const cpu_set_t& usable) {
  std::string first;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &usable)) continue;
    std::ifstream f("/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/cpufreq/cpuinfo_max_freq");
    std::string khz;
    if (!(f >> khz)) continue;
    if (first.empty()) first = khz;
    else if (khz != first) return false;
  }
  return true;
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
  cpu_set_t usable;
  const int cpus = sched_getaffinity(0, sizeof(usable), &usable) == 0 ? CPU_COUNT(&usable) : 0;
  if (threads > 0) {
    // more threads than usable CPUs only contend; thousands hang TVM's pool
    if (cpus > 0 && threads > cpus) {
      std::fprintf(stderr, "note: --threads %ld capped to the %d usable CPU(s)\n", threads, cpus);
      threads = cpus;
    }
    setenv("TVM_NUM_THREADS", std::to_string(threads).c_str(), 1);
  } else if (std::getenv("TVM_NUM_THREADS") == nullptr) {
    if (cpus > 0) setenv("TVM_NUM_THREADS", std::to_string(cpus).c_str(), 1);
  }
  // TVM pins each worker to a core but leaves the calling thread free to run anywhere; when the OS puts it on a
  // worker's core, the two share that core for the whole run (a third of fresh processes ran a small CNN at one
  // core's speed on a 2-core host). Where all usable cores are alike the workers stay unpinned, unless the user
  // set TVM_BIND_THREADS; boards with big and little cores keep the pinning that puts the threads on big cores.
  if (std::getenv("TVM_BIND_THREADS") == nullptr && cpus > 0 && IdenticalCores(usable)) setenv("TVM_BIND_THREADS", "0", 1);
  const char* bind = std::getenv("TVM_BIND_THREADS");
  const bool workers_pinned = bind == nullptr || std::atoi(bind) == 1;  // how TVM's thread pool reads it

  // Manifest.
  const std::string mpath = dir + "/manifest.json";
  json::Object man = AsObject(ParseJSON(ReadFile(mpath, "manifest"), mpath), mpath);
  if (Has(man, "format") && Str(man.at(ffi::String("format")), mpath) != "adntn-artifact")
    Fail(mpath + ": \"format\" is not \"adntn-artifact\"");
  if (Has(man, "version") && Int(man.at(ffi::String("version")), mpath) != 1)
    Fail(mpath + ": unsupported \"version\" (this runner reads version 1)");
  const std::string library = Str(Field(man, "library", mpath), mpath + " \"library\"");
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

  // Load the executable. main runs on a VM with the pooled allocator (its per-call buffers are reused across
  // calls); main_transform_params runs once on a VM of its own with the naive allocator, so the intermediates
  // of weight generation and packing go back to the system instead of staying in a pool for the whole run.
  const std::string lib = ContainedFile(dir, library, mpath + " \"library\"");
  CheckSha256(lib, "model library", ListedSha256(man, library, "library", mpath));
  CheckLibrary(lib);
  ffi::Module exec = ffi::Module::LoadFromFile(ffi::String(lib));
  auto make_vm = [&](int allocator) {
    ffi::Module vm = GetFunc(exec, "vm_load_executable", lib)().cast<ffi::Module>();
    GetFunc(vm, "vm_initialization", lib)(static_cast<int>(kDLCPU), 0, allocator);
    return vm;
  };
  constexpr int kNaiveAllocator = 1, kPooledAllocator = 2;  // tvm::runtime::memory::AllocatorType
  ffi::Module vm = make_vm(kPooledAllocator);

  // Params -> the weights main takes. The params are released once transformed, so after load the process
  // holds the weights once (the report line below says how much that is).
  const long base_kib = StatusKiB("VmRSS");
  uint64_t param_bytes = 0;
  std::vector<ffi::Any> transformed;
  if (transform) {
    const std::string pfile = Str(Field(man, "params_file", mpath), mpath + " \"params_file\"");
    const std::string ppath = ContainedFile(dir, pfile, mpath + " \"params_file\"");
    const std::string psha = ListedSha256(man, pfile, "params_file", mpath);
    std::vector<NamedTensor> params = ReadSafetensors(ppath, "params file", &psha);
    ffi::Array<ffi::Any> param_tuple;
    for (const auto& n : param_names) {
      const ffi::Tensor* t = Find(params, n);
      if (!t) Fail("params file '" + ppath + "' has no tensor '" + n + "' (listed in the manifest)");
      param_tuple.push_back(*t);
      param_bytes += ffi::GetDataSize(*t->GetDLTensorPtr());
    }
    ffi::Any r = GetFunc(make_vm(kNaiveAllocator), "main_transform_params", lib)(param_tuple);
    for (const ffi::Any& x : r.cast<ffi::Array<ffi::Any>>()) transformed.push_back(x);
  }
  ReturnFreedHeap();
  const long loaded_kib = StatusKiB("VmRSS"), peak_kib = StatusKiB("VmHWM");
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
  if (base_kib >= 0 && loaded_kib >= 0 && peak_kib >= 0)
    std::printf("memory: params %.1f MiB; resident after load +%.1f MiB, peak while loading +%.1f MiB\n",
                param_bytes / 1048576.0, (loaded_kib - base_kib) / 1024.0, (peak_kib - base_kib) / 1024.0);
  std::printf("mean latency of main: %.4f ms over %ld run(s) on %ld thread(s), %s\n", mean_ms, repeat, pool,
              workers_pinned ? "workers pinned to cores" : "workers not pinned");
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
