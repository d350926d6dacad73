/* kernel_harness LIB a.bin:d0,d1,... b.bin:... out.bin:...
 *
 * Runs the `main` of a library of TVM-compiled kernels (tvm.compile(...).export_library) without the
 * TVM runtime, which has no build for riscv64 here: float32 tensors read from raw files, the last one
 * the output, written back. It fills the backend hooks a kernel library calls through (parallel launch,
 * run serially as one task; workspace allocation, 64-byte aligned) and calls main through the tvm-ffi
 * safe-call ABI with DLTensor arguments. tests/test_rvv_kernels.py cross-compiles it and runs it under
 * qemu-riscv64 with the vector extension. The output starts as NaN, so an element the kernel never
 * writes shows up. Exit 0 on success, 1 with a line on stderr otherwise. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dlpack/dlpack.h>

typedef struct { int32_t type_index; uint32_t zero_padding; union { int64_t v_int64; void* v_ptr; }; } Any;
typedef struct { void* sync_handle; int32_t num_task; } Env;
typedef int (*Lambda)(int, Env*, void*);

static int launch(Lambda f, void* cdata, int num_task) {
  (void)num_task;
  Env env = {NULL, 1};
  return f(0, &env, cdata);
}
static void* alloc_ws(int dt, int di, uint64_t n, int c, int b) {
  (void)dt; (void)di; (void)c; (void)b;
  void* p = NULL;
  return posix_memalign(&p, 64, n ? n : 64) ? NULL : p;
}
static int free_ws(int dt, int di, void* p) { (void)dt; (void)di; free(p); return 0; }
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "kernel error %s:", kind);
  for (int i = 0; i < n; i++) fprintf(stderr, " %s", parts[i]);
  fprintf(stderr, "\n");
}

int main(int argc, char** argv) {
  if (argc < 3) { fprintf(stderr, "usage: harness LIB FILE:dims ...\n"); return 2; }
  void* lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 1; }
  const char* names[] = {"__TVMBackendParallelLaunch", "__TVMBackendAllocWorkspace", "__TVMBackendFreeWorkspace"};
  void* impls[] = {(void*)launch, (void*)alloc_ws, (void*)free_ws};
  for (int i = 0; i < 3; i++) { void** slot = (void**)dlsym(lib, names[i]); if (slot) *slot = impls[i]; }
  int (*fmain)(void*, const Any*, int32_t, Any*) = (int (*)(void*, const Any*, int32_t, Any*))dlsym(lib, "__tvm_ffi_main");
  if (!fmain) { fprintf(stderr, "no __tvm_ffi_main\n"); return 1; }
  int count = argc - 2;
  DLTensor* tensors = calloc(count, sizeof(DLTensor));
  Any* args = calloc(count, sizeof(Any));
  char** paths = calloc(count, sizeof(char*));
  size_t* sizes = calloc(count, sizeof(size_t));
  for (int t = 0; t < count; t++) {
    char* spec = strdup(argv[t + 2]);
    char* colon = strrchr(spec, ':');
    *colon = 0;
    paths[t] = spec;
    int64_t* shape = calloc(8, sizeof(int64_t));
    int ndim = 0;
    size_t elems = 1;
    for (char* tok = strtok(colon + 1, ","); tok; tok = strtok(NULL, ",")) { shape[ndim] = atoll(tok); elems *= shape[ndim++]; }
    void* data = alloc_ws(1, 0, elems * 4, 2, 32);
    if (t < count - 1) {
      FILE* f = fopen(spec, "rb");
      if (!f || fread(data, 4, elems, f) != elems) { fprintf(stderr, "cannot read %s\n", spec); return 1; }
      fclose(f);
    } else {
      memset(data, 0xff, elems * 4);  /* NaN: every output element must be written */
    }
    tensors[t].data = data;
    tensors[t].device.device_type = kDLCPU;
    tensors[t].ndim = ndim;
    tensors[t].dtype.code = kDLFloat; tensors[t].dtype.bits = 32; tensors[t].dtype.lanes = 1;
    tensors[t].shape = shape;
    args[t].type_index = 7;  /* kTVMFFIDLTensorPtr */
    args[t].v_ptr = &tensors[t];
    sizes[t] = elems;
  }
  Any result = {0};
  int rc = fmain(NULL, args, count, &result);
  if (rc != 0) { fprintf(stderr, "main returned %d\n", rc); return 1; }
  FILE* out = fopen(paths[count - 1], "wb");
  fwrite(tensors[count - 1].data, 4, sizes[count - 1], out);
  fclose(out);
  return 0;
}
