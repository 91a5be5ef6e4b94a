/*
 * A host-only stand-in for the AscendCL runtime, built as libascendcl.so for
 * ascend-quant's tests. It implements the subset in ../include/ascendcl.h:
 *
 * - devices: ASCEND_STUB_DEVICES (default 1) of them; "device memory" is host
 *   memory, and every copy is bounds-checked against its allocation;
 * - models: a file format of its own ("ASTB"), y_j = a * x_(j mod n) + b
 *   elementwise on float32 tensors with declared names and dims;
 * - failure injection: ASCEND_STUB_FAIL="aclrtMalloc,aclmdlExecute=100017"
 *   makes those functions fail (with the given code, default 500000);
 * - a ledger of every live object; aclFinalize fails with
 *   ACL_ERROR_RELATIVE_RESOURCE_NOT_CLEARED if anything is still alive, and
 *   destroying a context that still has streams, or resetting a device that
 *   still has contexts, fails too (the order the real runtime requires).
 */
#include "../include/ascendcl.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_OBJECTS 4096
#define MAX_IO 8

enum kind { K_FREE = 0, K_CONTEXT, K_STREAM, K_MEMORY, K_DATABUF, K_DATASET, K_DESC, K_MODEL };
static const char *KIND_NAMES[] = {"", "context", "stream", "device buffer", "data buffer", "dataset", "model description", "model"};

struct io {
    char name[ACL_MAX_TENSOR_NAME_LEN];
    uint32_t rank;
    int64_t dims[ACL_MAX_DIM_CNT];
    int32_t dtype;
    size_t bytes;
};

struct model {
    float a, b;
    uint32_t n_in, n_out;
    struct io in[MAX_IO], out[MAX_IO];
};

struct object {
    enum kind kind;
    void *addr;        /* memory: the allocation; databuf: the wrapped pointer */
    size_t size;       /* memory/databuf: bytes */
    void *owner;       /* stream/model: its context; context: NULL */
    int32_t device;    /* context: its device */
    uint32_t model_id; /* model */
    struct model m;    /* model, desc */
    void *items[MAX_IO * 2]; /* dataset: data buffers */
    size_t n_items;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct object objects[MAX_OBJECTS];
static int initialized = 0;
static int device_refs[64];
static uint32_t next_model_id = 1;
static __thread char last_error[512];
static __thread void *current_context = NULL;

static aclError fail(aclError code, const char *fmt, const char *detail) {
    snprintf(last_error, sizeof last_error, fmt, detail);
    return code;
}

/* Returns the injected error code for `fn`, or 0. */
static aclError injected(const char *fn) {
    const char *spec = getenv("ASCEND_STUB_FAIL");
    if (!spec) return 0;
    size_t n = strlen(fn);
    for (const char *p = spec; (p = strstr(p, fn)) != NULL; p += n) {
        int starts = (p == spec || p[-1] == ',');
        int ends = (p[n] == '\0' || p[n] == ',' || p[n] == '=');
        if (starts && ends) {
            aclError code = (p[n] == '=') ? (aclError)atoi(p + n + 1) : ACL_ERROR_INTERNAL_ERROR;
            snprintf(last_error, sizeof last_error, "EZ9999: injected failure in %s", fn);
            return code;
        }
    }
    return 0;
}

#define INJECT(fn) do { aclError e_ = injected(fn); if (e_) return e_; } while (0)

static int device_count(void) {
    const char *v = getenv("ASCEND_STUB_DEVICES");
    return v ? atoi(v) : 1;
}

static struct object *find(void *handle, enum kind kind) {
    struct object *o = (struct object *)handle;
    if (o < objects || o >= objects + MAX_OBJECTS || o->kind != kind) return NULL;
    return o;
}

static struct object *alloc_object(enum kind kind) {
    for (int i = 0; i < MAX_OBJECTS; i++) {
        if (objects[i].kind == K_FREE) {
            memset(&objects[i], 0, sizeof objects[i]);
            objects[i].kind = kind;
            return &objects[i];
        }
    }
    return NULL;
}

static void release(struct object *o) { memset(o, 0, sizeof *o); }

/* The allocation holding [p, p + n), or NULL. */
static struct object *memory_for(const void *p, size_t n) {
    for (int i = 0; i < MAX_OBJECTS; i++) {
        struct object *o = &objects[i];
        if (o->kind == K_MEMORY && (const char *)p >= (char *)o->addr &&
            (const char *)p + n <= (char *)o->addr + o->size)
            return o;
    }
    return NULL;
}

/* ---- init, version ---- */

aclError aclInit(const char *configPath) {
    (void)configPath;
    INJECT("aclInit");
    pthread_mutex_lock(&lock);
    aclError r = initialized ? fail(ACL_ERROR_REPEAT_INITIALIZE, "%s", "aclInit: repeat initialize") : ACL_SUCCESS;
    initialized = 1;
    pthread_mutex_unlock(&lock);
    return r;
}

aclError aclFinalize(void) {
    INJECT("aclFinalize");
    pthread_mutex_lock(&lock);
    if (!initialized) {
        pthread_mutex_unlock(&lock);
        return fail(ACL_ERROR_REPEAT_FINALIZE, "%s", "aclFinalize: not initialized");
    }
    char leaks[400] = "";
    int counts[8] = {0};
    for (int i = 0; i < MAX_OBJECTS; i++) counts[objects[i].kind]++;
    for (int k = K_CONTEXT; k <= K_MODEL; k++) {
        if (counts[k]) {
            char part[64];
            snprintf(part, sizeof part, "%s%d %s", leaks[0] ? ", " : "", counts[k], KIND_NAMES[k]);
            strncat(leaks, part, sizeof leaks - strlen(leaks) - 1);
        }
    }
    for (int d = 0; d < 64; d++) {
        if (device_refs[d]) {
            char part[64];
            snprintf(part, sizeof part, "%sdevice %d not reset", leaks[0] ? ", " : "", d);
            strncat(leaks, part, sizeof leaks - strlen(leaks) - 1);
        }
    }
    initialized = 0;
    pthread_mutex_unlock(&lock);
    if (leaks[0]) return fail(ACL_ERROR_RELATIVE_RESOURCE_NOT_CLEARED, "aclFinalize: still alive: %s", leaks);
    return ACL_SUCCESS;
}

const char *aclGetRecentErrMsg(void) { return last_error[0] ? last_error : NULL; }

aclError aclrtGetVersion(int32_t *major, int32_t *minor, int32_t *patch) {
    INJECT("aclrtGetVersion");
    *major = 1; *minor = 10; *patch = 0;
    return ACL_SUCCESS;
}

const char *aclrtGetSocName(void) {
    const char *v = getenv("ASCEND_STUB_SOC");
    return v ? v : "Ascend310P3";
}

aclError aclsysGetVersionStr(char *pkgName, char *versionStr) {
    (void)pkgName;
    INJECT("aclsysGetVersionStr");
    strcpy(versionStr, "8.0.stub");
    return ACL_SUCCESS;
}

/* ---- devices, contexts, streams ---- */

aclError aclrtGetDeviceCount(uint32_t *count) {
    INJECT("aclrtGetDeviceCount");
    *count = (uint32_t)device_count();
    return ACL_SUCCESS;
}

aclError aclrtSetDevice(int32_t id) {
    INJECT("aclrtSetDevice");
    if (id < 0 || id >= device_count()) return fail(ACL_ERROR_INVALID_DEVICE, "aclrtSetDevice: no device %s", "with that id");
    pthread_mutex_lock(&lock);
    device_refs[id]++;
    pthread_mutex_unlock(&lock);
    return ACL_SUCCESS;
}

aclError aclrtResetDevice(int32_t id) {
    INJECT("aclrtResetDevice");
    if (id < 0 || id >= device_count()) return fail(ACL_ERROR_INVALID_DEVICE, "%s", "aclrtResetDevice: invalid device");
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_OBJECTS; i++) {
        if (objects[i].kind == K_CONTEXT && objects[i].device == id) {
            pthread_mutex_unlock(&lock);
            return fail(ACL_ERROR_RESOURCE_NOT_MATCH, "%s", "aclrtResetDevice: a context of this device is still alive (destroy it first)");
        }
    }
    if (device_refs[id] > 0) device_refs[id] = 0;
    pthread_mutex_unlock(&lock);
    return ACL_SUCCESS;
}

aclError aclrtCreateContext(aclrtContext *context, int32_t id) {
    INJECT("aclrtCreateContext");
    if (id < 0 || id >= device_count()) return fail(ACL_ERROR_INVALID_DEVICE, "%s", "aclrtCreateContext: invalid device");
    pthread_mutex_lock(&lock);
    struct object *o = device_refs[id] ? alloc_object(K_CONTEXT) : NULL;
    if (o) o->device = id;
    pthread_mutex_unlock(&lock);
    if (!o) return fail(ACL_ERROR_INVALID_DEVICE, "%s", "aclrtCreateContext: device not set (call aclrtSetDevice first)");
    *context = o;
    current_context = o;
    return ACL_SUCCESS;
}

aclError aclrtDestroyContext(aclrtContext context) {
    INJECT("aclrtDestroyContext");
    pthread_mutex_lock(&lock);
    struct object *o = find(context, K_CONTEXT);
    aclError r = ACL_SUCCESS;
    if (!o) {
        r = fail(ACL_ERROR_INVALID_RESOURCE_HANDLE, "%s", "aclrtDestroyContext: unknown context");
    } else {
        for (int i = 0; i < MAX_OBJECTS; i++) {
            if ((objects[i].kind == K_STREAM || objects[i].kind == K_MODEL) && objects[i].owner == context) {
                r = fail(ACL_ERROR_RESOURCE_NOT_MATCH, "aclrtDestroyContext: a %s of this context is still alive", KIND_NAMES[objects[i].kind]);
                break;
            }
        }
        if (r == ACL_SUCCESS) {
            release(o);
            if (current_context == context) current_context = NULL;
        }
    }
    pthread_mutex_unlock(&lock);
    return r;
}

aclError aclrtSetCurrentContext(aclrtContext context) {
    INJECT("aclrtSetCurrentContext");
    pthread_mutex_lock(&lock);
    int ok = find(context, K_CONTEXT) != NULL;
    pthread_mutex_unlock(&lock);
    if (!ok) return fail(ACL_ERROR_INVALID_RESOURCE_HANDLE, "%s", "aclrtSetCurrentContext: unknown context");
    current_context = context;
    return ACL_SUCCESS;
}

aclError aclrtGetCurrentContext(aclrtContext *context) {
    if (!current_context) return fail(107002, "%s", "aclrtGetCurrentContext: no current context on this thread");
    *context = current_context;
    return ACL_SUCCESS;
}

#define NEED_CONTEXT(fn) do { if (!current_context) return fail(107002, "%s: no current context on this thread", fn); } while (0)

aclError aclrtCreateStream(aclrtStream *stream) {
    INJECT("aclrtCreateStream");
    NEED_CONTEXT("aclrtCreateStream");
    pthread_mutex_lock(&lock);
    struct object *o = alloc_object(K_STREAM);
    if (o) o->owner = current_context;
    pthread_mutex_unlock(&lock);
    if (!o) return fail(ACL_ERROR_BAD_ALLOC, "%s", "aclrtCreateStream: out of objects");
    *stream = o;
    return ACL_SUCCESS;
}

aclError aclrtDestroyStream(aclrtStream stream) {
    INJECT("aclrtDestroyStream");
    pthread_mutex_lock(&lock);
    struct object *o = find(stream, K_STREAM);
    if (o) release(o);
    pthread_mutex_unlock(&lock);
    return o ? ACL_SUCCESS : fail(ACL_ERROR_INVALID_RESOURCE_HANDLE, "%s", "aclrtDestroyStream: unknown stream");
}

aclError aclrtSynchronizeStream(aclrtStream stream) {
    INJECT("aclrtSynchronizeStream");
    pthread_mutex_lock(&lock);
    int ok = stream == NULL || find(stream, K_STREAM) != NULL;
    pthread_mutex_unlock(&lock);
    return ok ? ACL_SUCCESS : fail(ACL_ERROR_INVALID_RESOURCE_HANDLE, "%s", "aclrtSynchronizeStream: unknown stream");
}

/* ---- memory ---- */

aclError aclrtMalloc(void **ptr, size_t size, aclrtMemMallocPolicy policy) {
    (void)policy;
    INJECT("aclrtMalloc");
    NEED_CONTEXT("aclrtMalloc");
    if (size == 0) return fail(ACL_ERROR_INVALID_PARAM, "%s", "aclrtMalloc: size 0");
    void *p = calloc(1, size);
    if (!p) return fail(ACL_ERROR_BAD_ALLOC, "%s", "aclrtMalloc: out of memory");
    pthread_mutex_lock(&lock);
    struct object *o = alloc_object(K_MEMORY);
    if (o) { o->addr = p; o->size = size; }
    pthread_mutex_unlock(&lock);
    if (!o) { free(p); return fail(ACL_ERROR_BAD_ALLOC, "%s", "aclrtMalloc: out of objects"); }
    *ptr = p;
    return ACL_SUCCESS;
}

aclError aclrtFree(void *ptr) {
    INJECT("aclrtFree");
    pthread_mutex_lock(&lock);
    struct object *o = NULL;
    for (int i = 0; i < MAX_OBJECTS; i++)
        if (objects[i].kind == K_MEMORY && objects[i].addr == ptr) o = &objects[i];
    if (o) { free(o->addr); release(o); }
    pthread_mutex_unlock(&lock);
    return o ? ACL_SUCCESS : fail(ACL_ERROR_INVALID_PARAM, "%s", "aclrtFree: not a pointer from aclrtMalloc");
}

aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, aclrtMemcpyKind kind) {
    INJECT("aclrtMemcpy");
    if (count > destMax) return fail(ACL_ERROR_INVALID_PARAM, "%s", "aclrtMemcpy: count exceeds destMax");
    pthread_mutex_lock(&lock);
    int dst_dev = kind == ACL_MEMCPY_HOST_TO_DEVICE || kind == ACL_MEMCPY_DEVICE_TO_DEVICE;
    int src_dev = kind == ACL_MEMCPY_DEVICE_TO_HOST || kind == ACL_MEMCPY_DEVICE_TO_DEVICE;
    const char *bad = NULL;
    if (dst_dev && !memory_for(dst, count)) bad = "aclrtMemcpy: destination range is not inside a device allocation";
    if (src_dev && !memory_for(src, count)) bad = "aclrtMemcpy: source range is not inside a device allocation";
    pthread_mutex_unlock(&lock);
    if (bad) return fail(ACL_ERROR_INVALID_PARAM, "%s", bad);
    memmove(dst, src, count);
    return ACL_SUCCESS;
}

aclError aclrtGetMemInfo(aclrtMemAttr attr, size_t *free_, size_t *total) {
    (void)attr;
    INJECT("aclrtGetMemInfo");
    *total = (size_t)8 << 30;
    *free_ = (size_t)6 << 30;
    return ACL_SUCCESS;
}

/* ---- data buffers and datasets ---- */

aclDataBuffer *aclCreateDataBuffer(void *data, size_t size) {
    if (injected("aclCreateDataBuffer")) return NULL;
    pthread_mutex_lock(&lock);
    struct object *o = alloc_object(K_DATABUF);
    if (o) { o->addr = data; o->size = size; }
    pthread_mutex_unlock(&lock);
    return (aclDataBuffer *)o;
}

aclError aclDestroyDataBuffer(const aclDataBuffer *b) {
    INJECT("aclDestroyDataBuffer");
    pthread_mutex_lock(&lock);
    struct object *o = find((void *)b, K_DATABUF);
    if (o) release(o);
    pthread_mutex_unlock(&lock);
    return o ? ACL_SUCCESS : fail(ACL_ERROR_INVALID_PARAM, "%s", "aclDestroyDataBuffer: unknown buffer");
}

void *aclGetDataBufferAddr(const aclDataBuffer *b) {
    struct object *o = find((void *)b, K_DATABUF);
    return o ? o->addr : NULL;
}

size_t aclGetDataBufferSizeV2(const aclDataBuffer *b) {
    struct object *o = find((void *)b, K_DATABUF);
    return o ? o->size : 0;
}

aclmdlDataset *aclmdlCreateDataset(void) {
    if (injected("aclmdlCreateDataset")) return NULL;
    pthread_mutex_lock(&lock);
    struct object *o = alloc_object(K_DATASET);
    pthread_mutex_unlock(&lock);
    return (aclmdlDataset *)o;
}

aclError aclmdlDestroyDataset(const aclmdlDataset *d) {
    INJECT("aclmdlDestroyDataset");
    pthread_mutex_lock(&lock);
    struct object *o = find((void *)d, K_DATASET);
    if (o) release(o);
    pthread_mutex_unlock(&lock);
    return o ? ACL_SUCCESS : fail(ACL_ERROR_INVALID_PARAM, "%s", "aclmdlDestroyDataset: unknown dataset");
}

aclError aclmdlAddDatasetBuffer(aclmdlDataset *d, aclDataBuffer *b) {
    INJECT("aclmdlAddDatasetBuffer");
    pthread_mutex_lock(&lock);
    struct object *o = find(d, K_DATASET);
    aclError r = ACL_SUCCESS;
    if (!o || !find(b, K_DATABUF)) r = fail(ACL_ERROR_INVALID_PARAM, "%s", "aclmdlAddDatasetBuffer: unknown dataset or buffer");
    else if (o->n_items >= MAX_IO * 2) r = fail(ACL_ERROR_INVALID_PARAM, "%s", "aclmdlAddDatasetBuffer: too many buffers");
    else o->items[o->n_items++] = b;
    pthread_mutex_unlock(&lock);
    return r;
}

size_t aclmdlGetDatasetNumBuffers(const aclmdlDataset *d) {
    struct object *o = find((void *)d, K_DATASET);
    return o ? o->n_items : 0;
}

aclDataBuffer *aclmdlGetDatasetBuffer(const aclmdlDataset *d, size_t i) {
    struct object *o = find((void *)d, K_DATASET);
    return (o && i < o->n_items) ? (aclDataBuffer *)o->items[i] : NULL;
}

/* ---- models ---- */

static size_t dtype_size(int32_t t) {
    switch (t) {
        case ACL_FLOAT: case ACL_INT32: case ACL_UINT32: return 4;
        case ACL_FLOAT16: case ACL_INT16: case ACL_UINT16: return 2;
        case ACL_INT8: case ACL_UINT8: case ACL_BOOL: return 1;
        default: return 8;
    }
}

/* Parses the stub format: "ASTB", u32 version 1, u32 n_in, u32 n_out, f32 a, f32 b,
 * then per input and per output: char name[128], u32 rank, i64 dims[rank], i32 dtype. */
static int parse_model(const unsigned char *p, size_t n, struct model *m) {
    size_t at = 0;
#define TAKE(dst, len) do { if (at + (len) > n) return 0; memcpy((dst), p + at, (len)); at += (len); } while (0)
    char magic[4];
    uint32_t version;
    TAKE(magic, 4);
    if (memcmp(magic, "ASTB", 4) != 0) return 0;
    TAKE(&version, 4);
    TAKE(&m->n_in, 4);
    TAKE(&m->n_out, 4);
    if (version != 1 || m->n_in == 0 || m->n_in > MAX_IO || m->n_out > MAX_IO) return 0;
    TAKE(&m->a, 4);
    TAKE(&m->b, 4);
    for (uint32_t k = 0; k < m->n_in + m->n_out; k++) {
        struct io *io = k < m->n_in ? &m->in[k] : &m->out[k - m->n_in];
        TAKE(io->name, ACL_MAX_TENSOR_NAME_LEN);
        io->name[ACL_MAX_TENSOR_NAME_LEN - 1] = 0;
        TAKE(&io->rank, 4);
        if (io->rank > ACL_MAX_DIM_CNT) return 0;
        TAKE(io->dims, io->rank * 8);
        TAKE(&io->dtype, 4);
        size_t count = 1;
        for (uint32_t d = 0; d < io->rank; d++) count *= (size_t)io->dims[d];
        io->bytes = count * dtype_size(io->dtype);
    }
    return at == n;
#undef TAKE
}

aclError aclmdlLoadFromMem(const void *model, size_t size, uint32_t *modelId) {
    INJECT("aclmdlLoadFromMem");
    NEED_CONTEXT("aclmdlLoadFromMem");
    struct model m;
    memset(&m, 0, sizeof m);
    if (!parse_model(model, size, &m)) return fail(ACL_ERROR_PARSE_MODEL, "%s", "aclmdlLoad: not a stub model (ASTB) or truncated");
    pthread_mutex_lock(&lock);
    struct object *o = alloc_object(K_MODEL);
    if (o) { o->m = m; o->owner = current_context; o->model_id = next_model_id++; }
    pthread_mutex_unlock(&lock);
    if (!o) return fail(ACL_ERROR_BAD_ALLOC, "%s", "aclmdlLoad: out of objects");
    *modelId = o->model_id;
    return ACL_SUCCESS;
}

aclError aclmdlLoadFromFile(const char *path, uint32_t *modelId) {
    INJECT("aclmdlLoadFromFile");
    FILE *f = fopen(path, "rb");
    if (!f) return fail(ACL_ERROR_INVALID_FILE, "aclmdlLoadFromFile: cannot open %s", path);
    unsigned char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    return aclmdlLoadFromMem(buf, n, modelId);
}

static struct object *model_by_id(uint32_t id) {
    for (int i = 0; i < MAX_OBJECTS; i++)
        if (objects[i].kind == K_MODEL && objects[i].model_id == id) return &objects[i];
    return NULL;
}

aclError aclmdlUnload(uint32_t id) {
    INJECT("aclmdlUnload");
    pthread_mutex_lock(&lock);
    struct object *o = model_by_id(id);
    aclError r = ACL_SUCCESS;
    if (!o) r = fail(ACL_ERROR_INVALID_MODEL_ID, "%s", "aclmdlUnload: unknown model id");
    else if (o->owner != current_context) r = fail(ACL_ERROR_RESOURCE_NOT_MATCH, "%s", "aclmdlUnload: not under the context that loaded the model");
    else release(o);
    pthread_mutex_unlock(&lock);
    return r;
}

aclError aclmdlExecute(uint32_t id, const aclmdlDataset *input, aclmdlDataset *output) {
    INJECT("aclmdlExecute");
    pthread_mutex_lock(&lock);
    struct object *mo = model_by_id(id);
    struct object *in = find((void *)input, K_DATASET), *out = find(output, K_DATASET);
    const char *bad = NULL;
    if (!mo) bad = "aclmdlExecute: unknown model id";
    else if (mo->owner != current_context) bad = "aclmdlExecute: not under the context that loaded the model";
    else if (!in || !out) bad = "aclmdlExecute: unknown dataset";
    else if (in->n_items != mo->m.n_in) bad = "aclmdlExecute: wrong number of input buffers";
    else if (out->n_items != mo->m.n_out) bad = "aclmdlExecute: wrong number of output buffers";
    for (uint32_t k = 0; !bad && k < mo->m.n_in; k++) {
        struct object *b = find(in->items[k], K_DATABUF);
        if (!b || b->size < mo->m.in[k].bytes || !memory_for(b->addr, mo->m.in[k].bytes)) bad = "aclmdlExecute: an input buffer is too small or not device memory";
    }
    for (uint32_t k = 0; !bad && k < mo->m.n_out; k++) {
        struct object *b = find(out->items[k], K_DATABUF);
        if (!b || b->size < mo->m.out[k].bytes || !memory_for(b->addr, mo->m.out[k].bytes)) bad = "aclmdlExecute: an output buffer is too small or not device memory";
    }
    if (bad) {
        pthread_mutex_unlock(&lock);
        return fail(ACL_ERROR_MODEL_INPUT_NOT_MATCH, "%s", bad);
    }
    for (uint32_t k = 0; k < mo->m.n_out; k++) {
        struct object *ib = find(in->items[k % mo->m.n_in], K_DATABUF);
        struct object *ob = find(out->items[k], K_DATABUF);
        const float *x = ib->addr;
        float *y = ob->addr;
        size_t n = mo->m.out[k].bytes / 4, nx = mo->m.in[k % mo->m.n_in].bytes / 4;
        for (size_t i = 0; i < n; i++) y[i] = mo->m.a * x[i % nx] + mo->m.b;
    }
    pthread_mutex_unlock(&lock);
    return ACL_SUCCESS;
}

aclmdlDesc *aclmdlCreateDesc(void) {
    if (injected("aclmdlCreateDesc")) return NULL;
    pthread_mutex_lock(&lock);
    struct object *o = alloc_object(K_DESC);
    pthread_mutex_unlock(&lock);
    return (aclmdlDesc *)o;
}

aclError aclmdlDestroyDesc(aclmdlDesc *d) {
    INJECT("aclmdlDestroyDesc");
    pthread_mutex_lock(&lock);
    struct object *o = find(d, K_DESC);
    if (o) release(o);
    pthread_mutex_unlock(&lock);
    return o ? ACL_SUCCESS : fail(ACL_ERROR_INVALID_PARAM, "%s", "aclmdlDestroyDesc: unknown description");
}

aclError aclmdlGetDesc(aclmdlDesc *d, uint32_t id) {
    INJECT("aclmdlGetDesc");
    pthread_mutex_lock(&lock);
    struct object *o = find(d, K_DESC), *mo = model_by_id(id);
    if (o && mo) o->m = mo->m;
    pthread_mutex_unlock(&lock);
    return (o && mo) ? ACL_SUCCESS : fail(ACL_ERROR_INVALID_MODEL_ID, "%s", "aclmdlGetDesc: unknown description or model");
}

static const struct model *desc_model(const aclmdlDesc *d) {
    struct object *o = find((void *)d, K_DESC);
    return o ? &o->m : NULL;
}

size_t aclmdlGetNumInputs(aclmdlDesc *d) { const struct model *m = desc_model(d); return m ? m->n_in : 0; }
size_t aclmdlGetNumOutputs(aclmdlDesc *d) { const struct model *m = desc_model(d); return m ? m->n_out : 0; }

size_t aclmdlGetInputSizeByIndex(aclmdlDesc *d, size_t i) {
    const struct model *m = desc_model(d);
    return (m && i < m->n_in) ? m->in[i].bytes : 0;
}

size_t aclmdlGetOutputSizeByIndex(aclmdlDesc *d, size_t i) {
    const struct model *m = desc_model(d);
    return (m && i < m->n_out) ? m->out[i].bytes : 0;
}

static aclError get_dims(const struct io *io, aclmdlIODims *dims) {
    memcpy(dims->name, io->name, ACL_MAX_TENSOR_NAME_LEN);
    dims->dimCount = io->rank;
    memcpy(dims->dims, io->dims, io->rank * 8);
    return ACL_SUCCESS;
}

aclError aclmdlGetInputDims(const aclmdlDesc *d, size_t i, aclmdlIODims *dims) {
    INJECT("aclmdlGetInputDims");
    const struct model *m = desc_model(d);
    if (!m || i >= m->n_in) return fail(ACL_ERROR_INVALID_PARAM, "%s", "aclmdlGetInputDims: bad index");
    return get_dims(&m->in[i], dims);
}

aclError aclmdlGetOutputDims(const aclmdlDesc *d, size_t i, aclmdlIODims *dims) {
    INJECT("aclmdlGetOutputDims");
    const struct model *m = desc_model(d);
    if (!m || i >= m->n_out) return fail(ACL_ERROR_INVALID_PARAM, "%s", "aclmdlGetOutputDims: bad index");
    return get_dims(&m->out[i], dims);
}

const char *aclmdlGetInputNameByIndex(const aclmdlDesc *d, size_t i) {
    const struct model *m = desc_model(d);
    return (m && i < m->n_in) ? m->in[i].name : NULL;
}

const char *aclmdlGetOutputNameByIndex(const aclmdlDesc *d, size_t i) {
    const struct model *m = desc_model(d);
    return (m && i < m->n_out) ? m->out[i].name : NULL;
}

aclDataType aclmdlGetInputDataType(const aclmdlDesc *d, size_t i) {
    const struct model *m = desc_model(d);
    return (m && i < m->n_in) ? (aclDataType)m->in[i].dtype : ACL_DT_UNDEFINED;
}

aclDataType aclmdlGetOutputDataType(const aclmdlDesc *d, size_t i) {
    const struct model *m = desc_model(d);
    return (m && i < m->n_out) ? (aclDataType)m->out[i].dtype : ACL_DT_UNDEFINED;
}
