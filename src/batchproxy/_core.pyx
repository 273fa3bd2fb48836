# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Compiled wire codec (the contract is `_core.pyi`; `_core_py.py` is its pure-Python twin).

It reads and writes the protobuf wire format by hand, on `const uint8_t*` loops over the
serialized bytes: no protobuf objects, and no Python object per element on numeric paths.

Reading follows protobuf's rules so that the proxy sees what TFS's C++ runtime would see:
unknown fields of every wire type are skipped (groups included), a known field with an
unexpected wire type is an unknown field, repeated scalars are accepted packed and unpacked
(and split over several records), a singular scalar or bytes field keeps its last value, a
message field that appears twice is merged (we concatenate the records, which protobuf
defines as the same thing), and proto3 `string` fields must be UTF-8. Every read is bounds
checked: malformed or truncated input raises, it never reads past the buffer.

Writing computes every message's exact size first (length prefixes need the sizes of what
they prefix), allocates the final `bytes` once, and fills it through a bounds-checked cursor.
Multi-byte values are copied as they lie in memory: little-endian hosts only, as the TF wire
format for tensor_content is little-endian.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcpy, memset

# Declarations (constants, structs, the extension types' fields, the dtype tables) live in
# _core.pxd, which Cython reads before this file.

cdef extern from *:
    """
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "batchproxy._core assumes a little-endian host"
    #endif
    """

# TF's fill rule lets a few bytes on the wire (one value, a large shape) claim a large
# tensor. One request may spend at most this much on expansions, over all its inputs
# (strings count 8 bytes an element, one reference each); a tensor past the budget is not
# expanded and the call is forwarded unbatched. Same budget in the pure-Python core.
MAX_FILL_BYTES = (<int64_t>1) << 28
# The most elements a request tensor may claim (its non-zero dimensions multiplied): see
# _core_py.MAX_ELEMENTS. Keeps every size computed from a checked shape far from overflow.
MAX_ELEMENTS = ((<int64_t>1) << 31) - 1
# Element counts saturate here: larger shapes can never match a payload anyway.
SATURATED = (<int64_t>1) << 62


# --- per-dtype and per-field tables, filled from codec/dtypes.py --------------------------

# How a varint field's value maps to a normalized element, by (numpy kind, bytes).
_VARINT_KINDS = {("i", 1): VK_S8, ("u", 1): VK_U8, ("i", 2): VK_S16, ("u", 2): VK_U16,
                 ("i", 4): VK_S32, ("u", 4): VK_U32, ("i", 8): VK_64, ("u", 8): VK_64}


cdef int _fill_tables() except -1:
    # Imported here, not at the top: importing batchproxy.codec runs the core selector,
    # which reads this module's names, so the tables are filled last (see the module's
    # end), when every name exists.
    from batchproxy.codec import dtypes

    cdef int i
    if len(dtypes.DATA_TYPES) != NDTYPES or dtypes.DT_STRING != DT_STRING or \
            dtypes.DT_BOOL != DT_BOOL or dtypes.DT_COMPLEX64 != DT_COMPLEX64 or \
            dtypes.DT_COMPLEX128 != DT_COMPLEX128 or \
            (dtypes.DT_FLOAT, dtypes.DT_DOUBLE, dtypes.DT_INT32, dtypes.DT_UINT8,
             dtypes.DT_INT16, dtypes.DT_INT8, dtypes.DT_INT64, dtypes.DT_UINT32,
             dtypes.DT_UINT64) != (DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16,
                                   DT_INT8, DT_INT64, DT_UINT32, DT_UINT64):
        raise ImportError("batchproxy._core was built against another dtypes table")
    for i in range(NFIELDS):
        FIELD_WIRE[i] = -1
        COMP[i] = 0
        PER[i] = 1
    for field in dtypes.VALUE_FIELDS:
        FIELD_WIRE[field.number] = field.wire
        COMP[field.number] = field.component_bytes
        PER[field.number] = field.per_element
    for dt in dtypes.DATA_TYPES:
        i = dt.value
        ITEMSIZE[i] = dt.itemsize
        FIELD[i] = dtypes.FIELDS_BY_NAME[dt.field].number if dt.field else 0
        VKIND[i] = 0
        if dt.field and FIELD_WIRE[FIELD[i]] == dtypes.WIRE_VARINT:
            if dt.field == "bool_val":
                VKIND[i] = VK_BOOL
            else:
                code = dt.element.lstrip("<>|=")
                VKIND[i] = _VARINT_KINDS[(code[0], int(code[1:]))]
    return 0


cdef inline int _itemsize(int64_t dtype) noexcept:
    if 0 <= dtype < NDTYPES:
        return ITEMSIZE[dtype]
    return -1


cdef inline bint _valid_dtype(int64_t dtype) noexcept:
    """A tensorflow.DataType value: 1..33 or a _REF variant (+100); not DT_INVALID."""
    return 1 <= dtype <= 33 or 101 <= dtype <= 133


# --- public classes -----------------------------------------------------------------------


class CodecError(ValueError):
    """Input the codec refuses. `code` is a grpc.StatusCode name such as "INVALID_ARGUMENT"."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self):
        return f"CodecError({self.code!r}, {self.message!r})"

    def __reduce__(self):
        return (type(self), (self.code, self.message))


class _WireError(Exception):
    """Bytes that are not the protobuf wire format; callers word the CodecError."""


class _Mismatch(Exception):
    """A tensor whose payload disagrees with its shape; callers word the CodecError."""


cdef class Tensor:
    """A tensor in normalized form: every element, whatever encoding the client used."""

    def __init__(self, int dtype, shape, data):
        self.dtype = dtype
        self.shape = tuple(shape)
        self.data = data

    def __eq__(self, other):
        if not isinstance(other, Tensor):
            return NotImplemented
        return (self.dtype, self.shape, self.data) == (other.dtype, other.shape, other.data)

    def __repr__(self):
        return f"Tensor(dtype={self.dtype}, shape={self.shape}, data=<{len(self.data)}>)"

    def __reduce__(self):
        return (Tensor, (self.dtype, self.shape, self.data))


cdef inline Tensor _tensor(int dtype, tuple shape, object data):
    cdef Tensor t = Tensor.__new__(Tensor)
    t.dtype = dtype
    t.shape = shape
    t.data = data
    return t


cdef class PredictCall:
    """One decoded PredictRequest (see _core.pyi for every field)."""

    def __init__(self, model_name="", version=None, version_label=None, signature_name="",
                 output_filter=(), model_spec=b"", inputs=None, rows=None, key=None):
        self.model_name = model_name
        self.version = version
        self.version_label = version_label
        self.signature_name = signature_name
        self.output_filter = tuple(output_filter)
        self.model_spec = model_spec
        self.inputs = {} if inputs is None else inputs
        self.rows = _batch_rows(self.inputs, True) if rows is None else rows
        self.key = _make_key(self) if key is None else key

    def __repr__(self):
        return (
            f"PredictCall(model_name={self.model_name!r}, version={self.version!r}, "
            f"version_label={self.version_label!r}, signature_name={self.signature_name!r}, "
            f"rows={self.rows}, inputs={self.inputs!r})"
        )

    def __reduce__(self):
        return (PredictCall, (self.model_name, self.version, self.version_label,
                              self.signature_name, self.output_filter, self.model_spec,
                              self.inputs, self.rows, self.key))


cdef tuple _make_key(PredictCall call):
    cdef Tensor t
    cdef tuple sig
    if len(call.inputs) == 1:  # the common case: no sorting
        for name, value in call.inputs.items():
            t = value
            sig = ((name, t.dtype, t.shape[1:]),)
    else:
        items = []
        for name in sorted(call.inputs):
            t = call.inputs[name]
            items.append((name, t.dtype, t.shape[1:]))
        sig = tuple(items)
    # TFS reads an empty signature name as "serving_default": one batch key for both.
    return (call.model_name, call.version, call.version_label,
            call.signature_name or "serving_default", sig, call.output_filter)


cdef Py_ssize_t _batch_rows(dict inputs, bint batchable) except -2:
    """Shared dim 0 of the inputs, or -1 when the call cannot be batched."""
    cdef Tensor t
    cdef Py_ssize_t rows = -1
    cdef object d
    if not inputs or not batchable:
        return -1
    for value in inputs.values():
        t = value
        if not t.shape or _itemsize(t.dtype) < 0:
            return -1
        for d in t.shape:
            if d < 0:
                return -1
        if rows == -1:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            return -1
    return rows


def itemsize(dtype):
    """Bytes per element in tensor_content form; 0 for DT_STRING; -1 for unsupported dtypes."""
    if 0 <= dtype < NDTYPES:
        return ITEMSIZE[<int>dtype]
    return -1


# --- reading ------------------------------------------------------------------------------

cdef const uint8_t* _fail(str message) except NULL:
    raise _WireError(message)


cdef inline const uint8_t* rd_varint(const uint8_t* p, const uint8_t* end,
                                     uint64_t* out) except NULL:
    cdef uint64_t result = 0, b
    cdef int shift = 0
    if p < end and p[0] < 0x80:
        out[0] = p[0]
        return p + 1
    while True:
        if p >= end:
            return _fail("truncated varint")
        b = p[0]
        p += 1
        result |= (b & 0x7F) << shift  # bits past 64 fall off, as in protobuf
        if b < 0x80:
            out[0] = result
            return p
        shift += 7
        if shift > 63:
            return _fail("varint longer than 10 bytes")


cdef inline const uint8_t* rd_tag(const uint8_t* p, const uint8_t* end, uint32_t* field,
                                  int* wire) except NULL:
    cdef uint64_t v
    cdef const uint8_t* start = p
    if p < end and p[0] < 0x80:
        v = p[0]
        p += 1
    else:
        p = rd_varint(p, end, &v)
        # A tag is a varint32: protobuf (C++ and upb alike) refuses one of more than five
        # bytes, padded or not, and upb one past 32 bits.
        if p - start > 5 or v > 0xFFFFFFFF:
            return _fail("malformed tag")
    if v < 8:
        return _fail("field number 0")
    field[0] = <uint32_t>(v >> 3)
    wire[0] = <int>(v & 7)
    return p


cdef inline const uint8_t* rd_len(const uint8_t* p, const uint8_t* end,
                                  Py_ssize_t* n) except NULL:
    cdef uint64_t v
    p = rd_varint(p, end, &v)
    if v > <uint64_t>(end - p):
        return _fail("length past the end of the message")
    n[0] = <Py_ssize_t>v
    return p


cdef const uint8_t* skip_field(const uint8_t* p, const uint8_t* end, uint32_t field, int wire,
                               int depth) except NULL:
    """Past one field whose tag was just read; a group up to its matching end tag."""
    cdef uint64_t v
    cdef Py_ssize_t n
    cdef uint32_t f
    cdef int w
    if wire == 0:
        return rd_varint(p, end, &v)
    if wire == 1:
        if end - p < 8:
            return _fail("truncated fixed64")
        return p + 8
    if wire == 5:
        if end - p < 4:
            return _fail("truncated fixed32")
        return p + 4
    if wire == 2:
        p = rd_len(p, end, &n)
        return p + n
    if wire == 3:
        # Fields inside an unknown group are checked like any others (field number 0 is
        # malformed), as TFS's C++ runtime does; upb, protobuf's Python runtime, lets a
        # field number 0 pass inside a group, so the pure-Python core accepts that.
        if depth >= 100:  # protobuf's default recursion limit
            return _fail("groups nested too deeply")
        while True:
            p = rd_tag(p, end, &f, &w)
            if w == 4:
                if f != field:
                    return _fail("mismatched end-group tag")
                return p
            p = skip_field(p, end, f, w, depth + 1)
    if wire == 4:
        return _fail("end-group tag outside a group")
    return _fail(f"invalid wire type {wire}")


cdef str _utf8(const uint8_t* p, Py_ssize_t n):
    """A proto3 string field: UTF-8 or the message does not parse."""
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError:
        raise _WireError("string field is not valid UTF-8") from None


cdef inline Py_ssize_t count_varints(const uint8_t* p, const uint8_t* end) except -1:
    """Values in a packed varint payload, checking every one is complete and <= 10 bytes."""
    cdef Py_ssize_t count = 0
    cdef int run = 0
    while p < end:
        if p[0] & 0x80:
            run += 1
            if run >= 10:
                _fail("varint longer than 10 bytes")
        else:
            count += 1
            run = 0
        p += 1
    if run:
        _fail("truncated varint in a packed field")
    return count


cdef const uint8_t* scan_dim(const uint8_t* p, const uint8_t* end, TInfo* t) except NULL:
    cdef uint32_t f
    cdef int w
    cdef uint64_t v
    cdef Py_ssize_t n
    cdef int64_t size = 0
    cdef Span name
    name.p = p
    name.n = 0
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if f == 1 and w == 0:
            p = rd_varint(p, end, &v)
            size = <int64_t>v
        elif f == 2 and w == 2:
            p = rd_len(p, end, &n)
            if n:
                _utf8(p, n)
            name.p = p
            name.n = n
            p += n
        else:
            p = skip_field(p, end, f, w, 0)
    if t.ndims < MAX_RANK:
        t.dims[t.ndims] = size
        t.names[t.ndims] = name
        t.ndims += 1
    else:
        t.too_many_dims = True
    return end


cdef const uint8_t* scan_shape(const uint8_t* p, const uint8_t* end, TInfo* t) except NULL:
    cdef uint32_t f
    cdef int w
    cdef uint64_t v
    cdef Py_ssize_t n
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if f == 2 and w == 2:
            p = rd_len(p, end, &n)
            scan_dim(p, p + n, t)
            p += n
        elif f == 3 and w == 0:
            p = rd_varint(p, end, &v)
            t.unknown_rank = v != 0
        else:
            p = skip_field(p, end, f, w, 0)
    return end


cdef int scan_tensor(const uint8_t* p, const uint8_t* end, TInfo* t) except -1:
    """Validate a serialized TensorProto and record what it holds (see TInfo)."""
    cdef uint32_t f
    cdef int w, fw
    cdef uint64_t v
    cdef Py_ssize_t n
    cdef const uint8_t* q
    t.dtype = 0
    t.unknown_rank = False
    t.too_many_dims = False
    t.ndims = 0
    t.content.p = p
    t.content.n = 0
    memset(t.comps, 0, sizeof(t.comps))
    memset(t.records, 0, sizeof(t.records))
    memset(t.packed, 0, sizeof(t.packed))
    memset(t.rawlen, 0, sizeof(t.rawlen))
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if f < NFIELDS:
            fw = FIELD_WIRE[f]
            if f == 1 and w == 0:
                p = rd_varint(p, end, &v)
                t.dtype = <int32_t>(<uint32_t>v)  # an enum is an int32 on the wire
                continue
            if f == 2 and w == 2:
                p = rd_len(p, end, &n)
                scan_shape(p, p + n, t)
                p += n
                continue
            if f == 4 and w == 2:
                p = rd_len(p, end, &n)
                t.content.p = p
                t.content.n = n
                p += n
                continue
            if fw >= 0 and w == 2 and f != 8:  # a packed record
                p = rd_len(p, end, &n)
                if fw == 5:
                    if n & 3:
                        _fail("packed fixed32 field of a bad length")
                    t.comps[f] += n >> 2
                elif fw == 1:
                    if n & 7:
                        _fail("packed fixed64 field of a bad length")
                    t.comps[f] += n >> 3
                else:
                    t.comps[f] += count_varints(p, p + n)
                t.records[f] += 1
                t.packed[f] += 1
                t.rawlen[f] += n
                t.single[f].p = p
                t.single[f].n = n
                p += n
                continue
            if fw >= 0 and w == fw:  # one unpacked element (or one string_val)
                q = p
                if fw == 0:
                    p = rd_varint(p, end, &v)
                elif fw == 5:
                    if end - p < 4:
                        _fail("truncated fixed32")
                    p += 4
                elif fw == 1:
                    if end - p < 8:
                        _fail("truncated fixed64")
                    p += 8
                else:
                    p = rd_len(p, end, &n)
                    p += n
                t.comps[f] += 1
                t.records[f] += 1
                t.rawlen[f] += p - q
                continue
        p = skip_field(p, end, f, w, 0)
    return 0


cdef inline void _put_elem(uint8_t* out, Py_ssize_t i, uint64_t v, int vkind) noexcept:
    """Store a varint field's value as element i (the low bits, as TF's static_cast)."""
    cdef uint16_t u16
    cdef uint32_t u32
    if vkind == VK_BOOL:
        out[i] = v != 0
    elif vkind <= VK_U8:
        out[i] = <uint8_t>v
    elif vkind <= VK_U16:
        u16 = <uint16_t>v
        memcpy(out + 2 * i, &u16, 2)
    elif vkind <= VK_U32:
        u32 = <uint32_t>v
        memcpy(out + 4 * i, &u32, 4)
    else:
        memcpy(out + 8 * i, &v, 8)


cdef Py_ssize_t write_values(const uint8_t* p, const uint8_t* end, int field, int vkind,
                             uint8_t* out, Py_ssize_t limit) except -1:
    """Copy typed field `field` of an already scanned TensorProto into `out` as elements;
    `limit` components at most. Returns the components written."""
    cdef uint32_t f
    cdef int w
    cdef int fw = FIELD_WIRE[field]
    cdef int csz = COMP[field]
    cdef uint64_t v
    cdef Py_ssize_t n, k = 0
    cdef const uint8_t* q
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if f == <uint32_t>field and w == 2:
            p = rd_len(p, end, &n)
            q = p + n
            if fw == 0:
                while p < q:
                    p = rd_varint(p, q, &v)
                    if k >= limit:
                        _overflow()
                    _put_elem(out, k, v, vkind)
                    k += 1
            else:
                if k + n // csz > limit:
                    _overflow()
                memcpy(out + k * csz, p, n)
                k += n // csz
            p = q
        elif f == <uint32_t>field and w == fw:
            if k >= limit:
                _overflow()
            if fw == 0:
                p = rd_varint(p, end, &v)
                _put_elem(out, k, v, vkind)
            else:
                memcpy(out + k * csz, p, csz)
                p += csz
            k += 1
        else:
            p = skip_field(p, end, f, w, 0)
    return k


cdef list string_values(const uint8_t* p, const uint8_t* end):
    cdef uint32_t f
    cdef int w
    cdef Py_ssize_t n
    out = []
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if f == 8 and w == 2:
            p = rd_len(p, end, &n)
            out.append(PyBytes_FromStringAndSize(<const char*>p, n))
            p += n
        else:
            p = skip_field(p, end, f, w, 0)
    return out


cdef Py_ssize_t string_spans(const uint8_t* p, const uint8_t* end, Span* out,
                             Py_ssize_t limit) except -1:
    cdef uint32_t f
    cdef int w
    cdef Py_ssize_t n, k = 0
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if f == 8 and w == 2:
            p = rd_len(p, end, &n)
            if k >= limit:
                _overflow()
            out[k].p = p
            out[k].n = n
            k += 1
            p += n
        else:
            p = skip_field(p, end, f, w, 0)
    return k


cdef inline bint read_varint32(const uint8_t** pp, const uint8_t* end, uint32_t* out) noexcept:
    """TF's GetVarint32 (string tensor_content lengths): at most 5 bytes."""
    cdef const uint8_t* p = pp[0]
    cdef uint32_t result = 0
    cdef uint32_t b
    cdef int shift = 0
    while shift <= 28 and p < end:
        b = p[0]
        p += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            out[0] = result
            pp[0] = p
            return True
        shift += 7
    return False


cdef Py_ssize_t decode_string_spans(Span content, int64_t n, Span* out) except -2:
    """TF's DecodeStringList: n varint32 lengths, then the bytes. -1: malformed.
    `out` (n spans) may be NULL to only check."""
    cdef const uint8_t* p = content.p
    cdef const uint8_t* end = content.p + content.n
    cdef const uint8_t* data
    cdef uint32_t size
    cdef int64_t i, total = 0
    if n > content.n:  # every length takes a byte at least
        return -1
    for i in range(n):
        if not read_varint32(&p, end, &size):
            return -1
        total += size
    if total != end - p:
        return -1
    if out != NULL:
        data = p
        p = content.p
        for i in range(n):
            read_varint32(&p, end, &size)
            out[i].p = data
            out[i].n = size
            data += size
    return 0


cdef inline int64_t num_elements(TInfo* t, bint* known) noexcept:
    """Elements of the shape (saturated at SATURATED); known = rank and dims all known."""
    cdef Py_ssize_t i
    cdef int64_t n = 1, d
    known[0] = not t.unknown_rank
    for i in range(t.ndims):
        if t.dims[i] < 0:
            known[0] = False
        elif t.dims[i] == 0:
            n = 0
    if not known[0] or n == 0:
        return n
    for i in range(t.ndims):
        d = t.dims[i]
        if n > SATURATED // d:
            return SATURATED
        n *= d
    return n


cdef tuple dims_tuple(TInfo* t):
    cdef Py_ssize_t i
    return tuple([t.dims[i] for i in range(t.ndims)])


cdef bytes typed_bytes(const uint8_t* p, const uint8_t* end, TInfo* t, int64_t count,
                       int64_t n):
    """n elements of the dtype's typed field: its `count` values, then TF's fill."""
    cdef int dtype = t.dtype
    cdef int field = FIELD[dtype]
    cdef Py_ssize_t size = ITEMSIZE[dtype]
    cdef Py_ssize_t done, chunk, total
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n * size)
    cdef uint8_t* buf = <uint8_t*>PyBytes_AS_STRING(out)
    cdef uint8_t* dst
    if count:
        write_values(p, end, field, VKIND[dtype], buf, count * PER[field])
    if count == 0:
        memset(buf, 0, n * size)
    elif count < n:
        # Repeat the last element, doubling the copied run each time.
        dst = buf + count * size
        total = (n - count) * size
        memcpy(dst, buf + (count - 1) * size, size)
        done = size
        while done < total:
            chunk = done if done <= total - done else total - done
            memcpy(dst + done, dst, chunk)
            done += chunk
    return out


cdef str shape_text(TInfo* t):
    """The shape as messages quote it (the same text as _core_py._shape_text)."""
    cdef Py_ssize_t i, shown = t.ndims if t.ndims <= 8 else 8
    items = [str(t.dims[i]) for i in range(shown)]
    if t.ndims > 8:
        items.append("...")
    return "[" + ",".join(items) + "]"


cdef bint too_large(TInfo* t) noexcept:
    """Whether the non-zero dimensions (all >= 0) multiply past MAX_ELEMENTS."""
    cdef Py_ssize_t i
    cdef int64_t product = 1, d
    for i in range(t.ndims):
        d = t.dims[i]
        if d:
            if product > MAX_ELEMENTS // d:
                return True
            product *= d
    return False


cdef str too_large_message(TInfo* t):
    return (f"shape {shape_text(t)} is too large (the product of its non-zero dimensions "
            f"exceeds {MAX_ELEMENTS})")


cdef int64_t check_concrete(TInfo* t) except -1:
    """The element count of a tensor that must be concrete, as a request's are; raises
    _Mismatch otherwise. Same checks in the same order as _core_py._concrete_shape."""
    cdef Py_ssize_t i
    cdef int64_t n = 1
    if t.too_many_dims:
        raise _Mismatch("more than 254 dimensions")
    if not _valid_dtype(t.dtype):
        raise _Mismatch(f"invalid dtype {t.dtype}")
    if t.unknown_rank:
        raise _Mismatch("unknown rank")
    for i in range(t.ndims):
        if t.dims[i] < 0:
            raise _Mismatch(f"negative dimension {t.dims[i]} at index {i}")
    if too_large(t):
        raise _Mismatch(too_large_message(t))
    for i in range(t.ndims):
        n *= t.dims[i]  # cannot overflow: checked above
    return n


cdef Tensor normalize(const uint8_t* p, const uint8_t* end, TInfo* t, bint* batchable,
                      int64_t* budget):
    """The scanned TensorProto in normalized form (raises _Mismatch); batchable = whether a
    batch may hold it. `budget`: bytes fill expansions may still allocate for the request.
    Mirrors _core_py._normalize."""
    cdef int dtype = t.dtype
    cdef int size
    cdef int field, per
    cdef int64_t n, count
    cdef Py_ssize_t i
    cdef Span* spans
    batchable[0] = False
    n = check_concrete(t)
    shape = dims_tuple(t)
    size = _itemsize(dtype)
    if size < 0:  # a valid dtype the core does not batch (resource, variant, float8, refs)
        return _tensor(dtype, shape, b"")
    if dtype == DT_STRING:
        if t.content.n:
            if decode_string_spans(t.content, n, NULL) < 0:  # n <= content bytes if it passes
                raise _Mismatch("bad string tensor_content")
            spans = <Span*>PyMem_Malloc(max(n, 1) * sizeof(Span))
            if spans == NULL:
                raise MemoryError()
            try:
                decode_string_spans(t.content, n, spans)
                strings = [PyBytes_FromStringAndSize(<const char*>spans[i].p, spans[i].n)
                           for i in range(n)]
            finally:
                PyMem_Free(spans)
            batchable[0] = True
            return _tensor(dtype, shape, strings)
        strings = string_values(p, end)
        count = len(strings)
        if count > n:
            raise _Mismatch(f"{count} values for {n} elements")
        if count < n:
            if n * 8 > budget[0]:
                return _tensor(dtype, shape, strings)
            budget[0] -= n * 8
            strings.extend([strings[count - 1] if count else b""] * (n - count))
        batchable[0] = True
        return _tensor(dtype, shape, strings)
    if t.content.n:
        if t.content.n % size or t.content.n // size != n:
            raise _Mismatch(f"tensor_content of {t.content.n} bytes for {n} elements")
        batchable[0] = True
        return _tensor(dtype, shape,
                       PyBytes_FromStringAndSize(<const char*>t.content.p, t.content.n))
    field = FIELD[dtype]
    per = PER[field]
    if t.comps[field] % per:
        raise _Mismatch("odd number of complex components")
    count = t.comps[field] // per
    if count > n:
        raise _Mismatch(f"{count} values for {n} elements")
    if count < n:
        if n * size > budget[0]:
            return _tensor(dtype, shape, typed_bytes(p, end, t, count, count))
        budget[0] -= n * size
    batchable[0] = True
    return _tensor(dtype, shape, typed_bytes(p, end, t, count, n))


# --- writing ------------------------------------------------------------------------------

cdef int _overflow() except -1:
    raise SystemError("batchproxy._core: a computed message size was wrong")


cdef inline int vsize(uint64_t v) noexcept:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline Py_ssize_t ld_size(int field, Py_ssize_t n) noexcept:
    """Size of a length-delimited record of n bytes."""
    return vsize(<uint64_t>field << 3) + vsize(n) + n


cdef inline int w_varint(W* w, uint64_t v) except -1:
    if w.end - w.p < 10 and vsize(v) > w.end - w.p:
        _overflow()
    while v >= 0x80:
        w.p[0] = <uint8_t>(v | 0x80)
        w.p += 1
        v >>= 7
    w.p[0] = <uint8_t>v
    w.p += 1
    return 0


cdef inline int w_bytes(W* w, const void* src, Py_ssize_t n) except -1:
    if n > w.end - w.p:
        _overflow()
    if n:
        memcpy(w.p, src, n)
        w.p += n
    return 0


cdef inline int w_ld(W* w, int field, Py_ssize_t n) except -1:
    """The tag and length of a length-delimited record of n bytes."""
    w_varint(w, (<uint64_t>field << 3) | 2)
    return w_varint(w, n)


cdef inline bytes w_new(Py_ssize_t n, W* w):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    w.p = <uint8_t*>PyBytes_AS_STRING(out)
    w.end = w.p + n
    return out


cdef inline int w_done(W* w) except -1:
    if w.p != w.end:
        _overflow()
    return 0


cdef inline Py_ssize_t dim_size(int64_t size, const Span* name) noexcept:
    cdef Py_ssize_t s = 1 + vsize(<uint64_t>size)
    if name != NULL and name.n:
        s += ld_size(2, name.n)
    return s


cdef Py_ssize_t shape_size(Py_ssize_t ndims, const int64_t* dims, const Span* names) noexcept:
    cdef Py_ssize_t i, total = 0
    for i in range(ndims):
        total += ld_size(2, dim_size(dims[i], names + i if names != NULL else NULL))
    return total


cdef inline Py_ssize_t header_size(int32_t dtype, Py_ssize_t shape) noexcept:
    """dtype (proto3: omitted when 0) and the tensor_shape, always written."""
    cdef Py_ssize_t s = ld_size(2, shape)
    if dtype:
        s += 1 + vsize(<uint64_t><int64_t>dtype)
    return s


cdef int w_header(W* w, int32_t dtype, Py_ssize_t ndims, const int64_t* dims,
                  const Span* names, Py_ssize_t shape) except -1:
    cdef Py_ssize_t i
    cdef const Span* name
    if dtype:
        w_varint(w, 0x08)
        w_varint(w, <uint64_t><int64_t>dtype)
    w_ld(w, 2, shape)
    for i in range(ndims):
        name = names + i if names != NULL else NULL
        w_ld(w, 2, dim_size(dims[i], name))
        w_varint(w, 0x08)
        w_varint(w, <uint64_t>dims[i])
        if name != NULL and name.n:
            w_ld(w, 2, name.n)
            w_bytes(w, name.p, name.n)
    return 0


cdef inline uint64_t elem_varint(const uint8_t* src, Py_ssize_t i, int vkind) noexcept:
    """Element i of normalized data as its typed field's varint (sign-extended for the
    signed types, so a negative int_val is 10 bytes, as protobuf writes an int32)."""
    cdef int16_t s16
    cdef uint16_t u16
    cdef int32_t s32
    cdef uint32_t u32
    cdef uint64_t u64
    if vkind == VK_S8:
        return <uint64_t><int64_t>(<int8_t>src[i])
    if vkind == VK_U8:
        return src[i]
    if vkind == VK_BOOL:
        return src[i] != 0
    if vkind == VK_S16:
        memcpy(&s16, src + 2 * i, 2)
        return <uint64_t><int64_t>s16
    if vkind == VK_U16:
        memcpy(&u16, src + 2 * i, 2)
        return u16
    if vkind == VK_S32:
        memcpy(&s32, src + 4 * i, 4)
        return <uint64_t><int64_t>s32
    if vkind == VK_U32:
        memcpy(&u32, src + 4 * i, 4)
        return u32
    memcpy(&u64, src + 8 * i, 8)
    return u64


cdef int dims_from_tuple(tuple shape, int64_t* dims) except -1:
    cdef Py_ssize_t i, nd = len(shape)
    if nd > MAX_RANK:
        raise CodecError("INVALID_ARGUMENT", f"cannot encode a shape of {nd} dimensions")
    for i in range(nd):
        dims[i] = shape[i]
        if dims[i] < 0:
            raise CodecError("INVALID_ARGUMENT", f"cannot encode unknown shape {shape}")
    return 0


cdef bytes encode_tensor_c(int dtype, Py_ssize_t ndims, const int64_t* dims,
                           const Span* names, object data, bint typed):
    """A serialized TensorProto from normalized data. Strings travel as string_val when
    `typed`, else in TF's string tensor_content encoding (only concat asks for that)."""
    cdef int size = _itemsize(dtype)
    cdef int64_t n = 1
    cdef Py_ssize_t i, shape, payload = 0, body, ln
    cdef int field, vkind
    cdef const uint8_t* src
    cdef bytes s, out
    cdef list strings
    cdef W w
    if size < 0:
        raise CodecError("INVALID_ARGUMENT", f"cannot encode dtype {dtype}")
    for i in range(ndims):
        if dims[i] < 0:
            raise CodecError("INVALID_ARGUMENT", "cannot encode an unknown dimension")
        if dims[i] and n > SATURATED // dims[i]:
            raise CodecError("INVALID_ARGUMENT", "shape too large")
        n *= dims[i]
    shape = shape_size(ndims, dims, names)
    if dtype == DT_STRING:
        strings = data if type(data) is list else list(data)
        if len(strings) != n:
            raise CodecError("INVALID_ARGUMENT", f"{len(strings)} strings for {n} elements")
        for item in strings:
            if type(item) is not bytes:
                raise CodecError("INVALID_ARGUMENT", "string elements must be bytes")
            ln = PyBytes_GET_SIZE(item)
            payload += ld_size(8, ln) if typed else vsize(ln) + ln
        body = payload if typed else (ld_size(4, payload) if payload else 0)
        out = w_new(header_size(dtype, shape) + body, &w)
        w_header(&w, dtype, ndims, dims, names, shape)
        if typed:
            for item in strings:
                s = item
                w_ld(&w, 8, PyBytes_GET_SIZE(s))
                w_bytes(&w, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))
        elif payload:
            w_ld(&w, 4, payload)
            for item in strings:
                w_varint(&w, PyBytes_GET_SIZE(item))
            for item in strings:
                s = item
                w_bytes(&w, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))
        w_done(&w)
        return out
    if type(data) is not bytes:
        data = bytes(data)
    ln = PyBytes_GET_SIZE(data)
    if ln != n * size:
        raise CodecError("INVALID_ARGUMENT", f"{ln} bytes for {n} elements of {size}")
    src = <const uint8_t*>PyBytes_AS_STRING(data)
    field = FIELD[dtype]
    vkind = VKIND[dtype]
    if not typed:
        field = 4
        payload = ln
    elif FIELD_WIRE[field] != 0:
        payload = ln  # float/double/complex: the packed payload IS the elements' bytes
    else:
        for i in range(n):
            payload += vsize(elem_varint(src, i, vkind))
    out = w_new(header_size(dtype, shape) + (ld_size(field, payload) if payload else 0), &w)
    w_header(&w, dtype, ndims, dims, names, shape)
    if payload:
        w_ld(&w, field, payload)
        if field == 4 or FIELD_WIRE[field] != 0:
            w_bytes(&w, src, ln)
        else:
            for i in range(n):
                w_varint(&w, elem_varint(src, i, vkind))
    w_done(&w)
    return out


# --- public API: tensors ------------------------------------------------------------------


cdef inline bytes _as_bytes(object data):
    return data if type(data) is bytes else bytes(data)


def decode_tensor(data):
    """Parse one serialized TensorProto into normalized form (either encoding)."""
    cdef bytes buf = _as_bytes(data)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(buf)
    cdef const uint8_t* end = p + PyBytes_GET_SIZE(buf)
    cdef TInfo t
    cdef bint ok
    try:
        scan_tensor(p, end, &t)
    except _WireError as exc:
        raise CodecError("INVALID_ARGUMENT", f"Could not parse TensorProto: {exc}") from None
    cdef int64_t budget = MAX_FILL_BYTES
    try:
        return normalize(p, end, &t, &ok, &budget)
    except _Mismatch as exc:
        raise CodecError("INVALID_ARGUMENT", f"tensor parsing error: {exc}") from None


def encode_tensor(int dtype, shape, data, bint typed):
    """A serialized TensorProto: typed fields when `typed`, else tensor_content (strings
    always use string_val)."""
    cdef int64_t dims[MAX_RANK]
    cdef tuple shp = tuple(shape)
    dims_from_tuple(shp, dims)
    return encode_tensor_c(dtype, len(shp), dims, NULL, data, typed or dtype == DT_STRING)


def encode_predict_response(dict outputs, model_spec):
    """A serialized PredictResponse from serialized TensorProtos and a serialized ModelSpec."""
    cdef Py_ssize_t total = 0, k, v
    cdef bytes spec = _as_bytes(model_spec)
    cdef bytes out, kb, vb
    cdef W w
    items = []
    for name, value in outputs.items():
        kb = name.encode("utf-8")
        vb = _as_bytes(value)
        k = PyBytes_GET_SIZE(kb)
        v = PyBytes_GET_SIZE(vb)
        total += ld_size(1, ld_size(1, k) + ld_size(2, v))
        items.append((kb, vb))
    if PyBytes_GET_SIZE(spec):
        total += ld_size(2, PyBytes_GET_SIZE(spec))
    out = w_new(total, &w)
    for kb, vb in items:
        k = PyBytes_GET_SIZE(kb)
        v = PyBytes_GET_SIZE(vb)
        w_ld(&w, 1, ld_size(1, k) + ld_size(2, v))
        w_ld(&w, 1, k)
        w_bytes(&w, PyBytes_AS_STRING(kb), k)
        w_ld(&w, 2, v)
        w_bytes(&w, PyBytes_AS_STRING(vb), v)
    if PyBytes_GET_SIZE(spec):
        w_ld(&w, 2, PyBytes_GET_SIZE(spec))
        w_bytes(&w, PyBytes_AS_STRING(spec), PyBytes_GET_SIZE(spec))
    w_done(&w)
    return out


# --- public API: requests -----------------------------------------------------------------


cdef tuple parse_model_spec(const uint8_t* p, const uint8_t* end):
    """(name, version, version_label, signature_name); version and label are a oneof, so
    the last one on the wire wins, and Int64Value records merge."""
    cdef uint32_t f, f2
    cdef int w, w2, case = 0
    cdef Py_ssize_t n
    cdef uint64_t v
    cdef int64_t version = 0
    cdef const uint8_t* q
    cdef const uint8_t* qend
    name = ""
    signature = ""
    label = None
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if w == 2 and 1 <= f <= 4:
            p = rd_len(p, end, &n)
            if f == 1:
                name = _utf8(p, n)
            elif f == 3:
                signature = _utf8(p, n)
            elif f == 4:
                label = _utf8(p, n)
                case = 4
            else:
                if case != 2:
                    version = 0
                    case = 2
                q = p
                qend = p + n
                while q < qend:
                    q = rd_tag(q, qend, &f2, &w2)
                    if f2 == 1 and w2 == 0:
                        q = rd_varint(q, qend, &v)
                        version = <int64_t>v
                    else:
                        q = skip_field(q, qend, f2, w2, 0)
            p += n
        else:
            p = skip_field(p, end, f, w, 0)
    return (name, version if case == 2 else None, label if case == 4 else None, signature)


cdef int validate_tensor(bytes data) except -1:
    cdef TInfo t
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
    return scan_tensor(p, p + PyBytes_GET_SIZE(data), &t)


cdef bytes joined_spec(list spans):
    """The ModelSpec records joined (= merged); each must parse on its own first."""
    cdef const uint8_t* p
    if len(spans) == 1:
        return spans[0]
    for span in spans:
        p = <const uint8_t*>PyBytes_AS_STRING(span)
        parse_model_spec(p, p + PyBytes_GET_SIZE(span))
    return b"".join(spans)


cdef tuple parse_entry(const uint8_t* p, const uint8_t* end, bytes base, str what):
    """A map<string, TensorProto> entry: (key, value). The value is a (bytes, start, stop)
    view: into `base` for the usual single record, else the records joined (= merged).
    `what` ("input", "output") names the entry in wire errors of its value."""
    cdef uint32_t f
    cdef int w
    cdef Py_ssize_t n
    cdef const uint8_t* start = <const uint8_t*>PyBytes_AS_STRING(base)
    cdef const uint8_t* key_p = p
    cdef Py_ssize_t key_n = 0
    cdef Py_ssize_t nvalues = 0, vstart = 0, vn = 0, nkeys = 0
    parts = None
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if w == 2 and (f == 1 or f == 2):
            p = rd_len(p, end, &n)
            if f == 1:
                if nkeys:  # a key given twice: the last wins, but each must be UTF-8
                    _utf8(key_p, key_n)
                key_p = p
                key_n = n
                nkeys += 1
            else:
                if nvalues == 1:
                    parts = [PyBytes_FromStringAndSize(<const char*>start + vstart, vn)]
                if nvalues >= 1:
                    parts.append(PyBytes_FromStringAndSize(<const char*>p, n))
                vstart = p - start
                vn = n
                nvalues += 1
            p += n
        else:
            p = skip_field(p, end, f, w, 0)
    key = _utf8(key_p, key_n)
    if nvalues > 1:
        # Each record must parse on its own; merged, they are one message.
        try:
            for part in parts:
                validate_tensor(part)
        except _WireError as exc:
            raise _WireError(f"{what} {key}: {exc}") from None
        joined = b"".join(parts)
        return key, (joined, 0, PyBytes_GET_SIZE(joined))
    if nvalues == 0:
        return key, (b"", 0, 0)
    return key, (base, vstart, vstart + vn)


cdef PredictCall decode_request(bytes data, list where):
    cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef const uint8_t* p = base
    cdef const uint8_t* end = base + PyBytes_GET_SIZE(data)
    cdef const uint8_t* vp
    cdef uint32_t f
    cdef int w
    cdef Py_ssize_t n
    cdef TInfo t
    cdef bint ok
    cdef bytes vbuf
    cdef int64_t budget = MAX_FILL_BYTES
    cdef PredictCall call = PredictCall.__new__(PredictCall)
    specs = []
    filters = []
    inputs = {}
    results = {}  # name -> (Tensor, batchable) or the _Mismatch it raised
    duplicate = None  # the first input name seen twice
    # Wire errors anywhere win over a duplicate name, which wins over a bad tensor (the
    # first in wire order): the order in which the pure-Python core finds them.
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if w == 2 and 1 <= f <= 3:
            p = rd_len(p, end, &n)
            if f == 1:
                specs.append(PyBytes_FromStringAndSize(<const char*>p, n))
            elif f == 2:
                key, (vbuf, vstart, vstop) = parse_entry(p, p + n, data, "input")
                vp = <const uint8_t*>PyBytes_AS_STRING(vbuf)
                where[0] = key  # named in a wire error (decode_predict_request)
                scan_tensor(vp + <Py_ssize_t>vstart, vp + <Py_ssize_t>vstop, &t)
                where[0] = None
                if key in results:
                    # protobuf would keep the last entry; which one the client meant is
                    # anyone's guess, so the request is refused (below).
                    if duplicate is None:
                        duplicate = key
                elif duplicate is None:
                    try:
                        tensor = normalize(vp + <Py_ssize_t>vstart, vp + <Py_ssize_t>vstop,
                                           &t, &ok, &budget)
                        results[key] = (tensor, ok)
                    except _Mismatch as exc:
                        results[key] = exc
                else:
                    results[key] = None  # refused anyway: not worth normalizing
            else:
                filters.append(_utf8(p, n))
            p += n
        else:
            p = skip_field(p, end, f, w, 0)
    spec = joined_spec(specs) if specs else b""
    vp = <const uint8_t*>PyBytes_AS_STRING(spec)
    name, version, label, signature = parse_model_spec(vp, vp + PyBytes_GET_SIZE(spec))
    if duplicate is not None:
        raise CodecError("INVALID_ARGUMENT", f"tensor parsing error: {duplicate}: the "
                                             f"inputs map holds this key more than once")
    batchable = True
    for key, result in results.items():
        if isinstance(result, _Mismatch):
            raise CodecError("INVALID_ARGUMENT", f"tensor parsing error: {key}: {result}")
        inputs[key] = result[0]
        batchable = batchable and result[1]
    call.model_name = name
    call.version = version
    call.version_label = label
    call.signature_name = signature
    call.output_filter = tuple(filters)
    call.model_spec = spec
    call.inputs = inputs
    call.rows = _batch_rows(inputs, batchable)
    call.key = _make_key(call)
    return call


def decode_predict_request(data):
    """Parse a serialized PredictRequest. Raises CodecError("INVALID_ARGUMENT", ...)."""
    where = [None]  # the input whose tensor was being read
    try:
        return decode_request(_as_bytes(data), where)
    except _WireError as exc:
        name = "" if where[0] is None else f"input {where[0]}: "
        raise CodecError("INVALID_ARGUMENT",
                         f"Could not parse PredictRequest: {name}{exc}") from None


def encode_predict_request(list pieces, Py_ssize_t pad_rows=0):
    """One PredictRequest holding rows [start, stop) of each call, concatenated along dim 0,
    then `pad_rows` copies of the last row sent (an allowed batch size). All calls share one
    key; model_spec and output_filter come from the first. Numeric inputs travel as
    tensor_content, strings as string_val."""
    cdef PredictCall first, call, pad_call
    cdef Tensor tensor, t
    cdef Py_ssize_t start, stop, total = 0, size, i, nd, per_row, row_bytes, payload, tsize
    cdef Py_ssize_t shape, ln, out_size, pad_at = 0, k
    cdef int64_t dims[MAX_RANK]
    cdef bytes out, kb, spec, data, s
    cdef W w
    if not pieces:
        raise CodecError("INTERNAL", "encode_predict_request needs at least one piece")
    if pad_rows < 0:
        raise CodecError("INTERNAL", f"negative padding of {pad_rows} rows")
    first = pieces[0][0]
    sig = first.key[4]
    for piece in pieces:
        call = piece[0]
        start = piece[1]
        stop = piece[2]
        if call.rows < 0 or not 0 <= start <= stop <= call.rows:
            raise CodecError("INTERNAL", f"rows [{start}, {stop}) outside a call of {call.rows}")
        if call is not first and call.key[4] != sig:
            raise CodecError("INTERNAL", "pieces of calls with different inputs")
        total += stop - start
    if pad_rows and total == 0:
        raise CodecError("INTERNAL", "no row to pad with")
    # The padding copies the last row sent: a real row, so the model sees valid input.
    pad_call = pieces[len(pieces) - 1][0]  # no negative index: wraparound is off
    for piece in pieces:
        if <Py_ssize_t>piece[2] > <Py_ssize_t>piece[1]:
            pad_call = piece[0]
            pad_at = <Py_ssize_t>piece[2] - 1
    spec = first.model_spec
    out_size = ld_size(1, PyBytes_GET_SIZE(spec))
    plans = []
    for name, value in first.inputs.items():
        tensor = value
        if _itemsize(tensor.dtype) < 0 or not tensor.shape:
            raise CodecError("INTERNAL", f"input {name} cannot be batched")
        nd = len(tensor.shape)
        dims_from_tuple(tensor.shape, dims)
        dims[0] = total + pad_rows
        per_row = 1
        for i in range(1, nd):
            per_row *= dims[i]
        shape = shape_size(nd, dims, NULL)
        kb = name.encode("utf-8")
        if tensor.dtype == DT_STRING:
            strings = []
            for piece in pieces:
                t = (<PredictCall>piece[0]).inputs[name]
                strings.extend(t.data[<Py_ssize_t>piece[1] * per_row :
                                      <Py_ssize_t>piece[2] * per_row])
            if pad_rows:
                t = pad_call.inputs[name]
                strings.extend(t.data[pad_at * per_row : (pad_at + 1) * per_row] * pad_rows)
            payload = 0
            for item in strings:
                if type(item) is not bytes:
                    raise CodecError("INTERNAL", f"input {name}: string elements must be bytes")
                payload += ld_size(8, PyBytes_GET_SIZE(item))
            tsize = header_size(DT_STRING, shape) + payload
            plans.append((name, kb, tensor, strings, tsize, shape, 0))
        else:
            row_bytes = per_row * ITEMSIZE[tensor.dtype]
            payload = (total + pad_rows) * row_bytes
            tsize = header_size(tensor.dtype, shape) + (ld_size(4, payload) if payload else 0)
            plans.append((name, kb, tensor, None, tsize, shape, row_bytes))
        out_size += ld_size(2, ld_size(1, PyBytes_GET_SIZE(kb)) + ld_size(2, tsize))
    encoded_filters = [name.encode("utf-8") for name in first.output_filter]
    for kb in encoded_filters:
        out_size += ld_size(3, PyBytes_GET_SIZE(kb))

    out = w_new(out_size, &w)
    w_ld(&w, 1, PyBytes_GET_SIZE(spec))
    w_bytes(&w, PyBytes_AS_STRING(spec), PyBytes_GET_SIZE(spec))
    for key, kb, value, strings, tsize, shape, row_bytes in plans:
        tensor = value
        nd = len(tensor.shape)
        dims_from_tuple(tensor.shape, dims)
        dims[0] = total + pad_rows
        ln = PyBytes_GET_SIZE(kb)
        w_ld(&w, 2, ld_size(1, ln) + ld_size(2, tsize))
        w_ld(&w, 1, ln)
        w_bytes(&w, PyBytes_AS_STRING(kb), ln)
        w_ld(&w, 2, tsize)
        w_header(&w, tensor.dtype, nd, dims, NULL, shape)
        if strings is not None:
            for item in strings:
                s = item
                w_ld(&w, 8, PyBytes_GET_SIZE(s))
                w_bytes(&w, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))
            continue
        payload = (total + pad_rows) * <Py_ssize_t>row_bytes
        if not payload:
            continue
        w_ld(&w, 4, payload)
        for piece in pieces:
            t = (<PredictCall>piece[0]).inputs[key]
            data = t.data
            start = <Py_ssize_t>piece[1] * <Py_ssize_t>row_bytes
            stop = <Py_ssize_t>piece[2] * <Py_ssize_t>row_bytes
            if stop > PyBytes_GET_SIZE(data) or t.dtype != tensor.dtype:
                raise CodecError("INTERNAL", f"input {key} does not match its shape")
            w_bytes(&w, PyBytes_AS_STRING(data) + start, stop - start)
        if pad_rows:
            t = pad_call.inputs[key]
            data = t.data
            start = pad_at * <Py_ssize_t>row_bytes
            for k in range(pad_rows):
                w_bytes(&w, PyBytes_AS_STRING(data) + start, row_bytes)
    for kb in encoded_filters:
        w_ld(&w, 3, PyBytes_GET_SIZE(kb))
        w_bytes(&w, PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb))
    w_done(&w)
    return out


def pad_length(Tensor tensor, Py_ssize_t length, bytes pad):
    """`tensor` with dimension 1 padded to `length` with the element `pad` (its
    little-endian bytes; for DT_STRING the string itself) after each row's own elements."""
    cdef tuple shape = tensor.shape
    cdef Py_ssize_t rows, old, per = 1, keep, extra, size, block, row, i
    cdef bytes content, fill, out
    cdef char* dst
    cdef const char* src
    if len(shape) < 2 or length < <Py_ssize_t>shape[1]:
        raise CodecError("INTERNAL", f"cannot pad shape {list(shape)} to length {length}")
    if length == <Py_ssize_t>shape[1]:
        return tensor
    rows = shape[0]
    old = shape[1]
    for i in range(2, len(shape)):
        per *= <Py_ssize_t>shape[i]
    new_shape = (rows, length, *shape[2:])
    keep = old * per
    extra = (length - old) * per
    if tensor.dtype == DT_STRING:
        strings = tensor.data
        padded = []
        for row in range(rows):
            padded.extend(strings[row * keep : (row + 1) * keep])
            padded.extend([pad] * extra)
        return _tensor(DT_STRING, new_shape, padded)
    size = _itemsize(tensor.dtype)
    if size <= 0 or PyBytes_GET_SIZE(pad) != size:
        raise CodecError("INTERNAL", f"a pad element of {len(pad)} bytes for dtype "
                                     f"{tensor.dtype}")
    content = tensor.data
    block = keep * size
    if PyBytes_GET_SIZE(content) != rows * block:
        raise CodecError("INTERNAL", "tensor data does not match its shape")
    fill = pad * extra
    out = PyBytes_FromStringAndSize(NULL, rows * (block + extra * size))
    dst = PyBytes_AS_STRING(out)
    src = PyBytes_AS_STRING(content)
    for row in range(rows):
        memcpy(dst, src + row * block, block)
        dst += block
        memcpy(dst, PyBytes_AS_STRING(fill), extra * size)
        dst += extra * size
    return _tensor(tensor.dtype, new_shape, out)


# --- public API: responses ----------------------------------------------------------------


cdef tuple read_outputs(bytes data):
    """(entries, model_spec or None) of a PredictResponse. entries: [key str, key bytes,
    value bytes, start, stop] in wire order; a repeated key keeps its first place and its
    last value. Every value is validated here."""
    cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef const uint8_t* p = base
    cdef const uint8_t* end = base + PyBytes_GET_SIZE(data)
    cdef const uint8_t* vp
    cdef uint32_t f
    cdef int w
    cdef Py_ssize_t n
    cdef TInfo t
    cdef bytes vbuf
    entries = {}
    specs = []
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if w == 2 and (f == 1 or f == 2):
            p = rd_len(p, end, &n)
            if f == 1:
                key, (vbuf, vstart, vstop) = parse_entry(p, p + n, data, "output")
                vp = <const uint8_t*>PyBytes_AS_STRING(vbuf)
                try:
                    scan_tensor(vp + <Py_ssize_t>vstart, vp + <Py_ssize_t>vstop, &t)
                except _WireError as exc:
                    raise _WireError(f"output {key}: {exc}") from None
                entries[key] = [key, key.encode("utf-8"), vbuf, vstart, vstop]
            else:
                specs.append(PyBytes_FromStringAndSize(<const char*>p, n))
            p += n
        else:
            p = skip_field(p, end, f, w, 0)
    spec = joined_spec(specs) if specs else None
    if spec is not None:  # echoed as is, but it must parse, as protobuf would insist
        vp = <const uint8_t*>PyBytes_AS_STRING(spec)
        parse_model_spec(vp, vp + PyBytes_GET_SIZE(spec))
    return list(entries.values()), spec


def decode_predict_response(data):
    """(outputs by name, sorted, in normalized form; the version that answered or None) of a
    serialized PredictResponse, read without protobuf objects: what the REST frontend needs
    to write its JSON. Mirrors _core_py.decode_predict_response. CodecError("INTERNAL") for
    bytes that do not parse or an output that is malformed (payload against shape, a partial
    fill too large to expand): the replica broke the contract, not the client."""
    cdef bytes buf = _as_bytes(data)
    cdef const uint8_t* vp
    cdef TInfo t
    cdef bint ok
    cdef int64_t budget = MAX_FILL_BYTES
    cdef Tensor tensor
    try:
        entries, spec = read_outputs(buf)
    except _WireError as exc:
        raise CodecError("INTERNAL", f"Could not parse PredictResponse: {exc}") from None
    outputs = {}
    for key, _, vbuf, vstart, vstop in sorted(entries):
        vp = <const uint8_t*>PyBytes_AS_STRING(vbuf)
        scan_tensor(vp + <Py_ssize_t>vstart, vp + <Py_ssize_t>vstop, &t)  # read_outputs: valid
        try:
            tensor = normalize(vp + <Py_ssize_t>vstart, vp + <Py_ssize_t>vstop, &t, &ok, &budget)
        except _Mismatch as exc:
            raise CodecError("INTERNAL", f"output {key}: {exc}") from None
        if not ok and _itemsize(tensor.dtype) >= 0:
            raise CodecError("INTERNAL", f"output {key}: too large to expand")
        outputs[key] = tensor
    version = None
    if spec is not None:
        vp = <const uint8_t*>PyBytes_AS_STRING(spec)
        version = parse_model_spec(vp, vp + PyBytes_GET_SIZE(spec))[1]
    return outputs, version


cdef inline Py_ssize_t advance_varints(Src* s, int64_t target) except -1:
    """Move the cursor to value `target` of a packed varint source; its byte offset."""
    while s.cur_idx < target:
        while s.cur_pos < s.n and s.p[s.cur_pos] & 0x80:
            s.cur_pos += 1
        if s.cur_pos >= s.n:
            _overflow()
        s.cur_pos += 1
        s.cur_idx += 1
    return s.cur_pos


cdef bytes gather_field(const uint8_t* p, const uint8_t* end, int field, Py_ssize_t rawlen):
    """The values of a typed field spread over several records, as one packed payload."""
    cdef uint32_t f
    cdef int w
    cdef int fw = FIELD_WIRE[field]
    cdef Py_ssize_t n
    cdef uint64_t v
    cdef const uint8_t* q
    cdef W out
    cdef bytes buf = w_new(rawlen, &out)
    while p < end:
        p = rd_tag(p, end, &f, &w)
        if f == <uint32_t>field and w == 2:
            p = rd_len(p, end, &n)
            w_bytes(&out, p, n)
            p += n
        elif f == <uint32_t>field and w == fw:
            q = p
            p = skip_field(p, end, f, w, 0)
            w_bytes(&out, q, p - q)
        else:
            p = skip_field(p, end, f, w, 0)
    w_done(&out)
    return buf


cdef int setup_source(Src* s, TInfo* t, const uint8_t* p, const uint8_t* end, int64_t n,
                      str name, list keep) except -1:
    """Describe where output `name`'s values are; errors are INTERNAL (a broken replica)."""
    cdef int dtype = t.dtype
    cdef int field, per
    cdef int64_t count
    cdef Py_ssize_t i
    cdef bytes gathered
    s.kind = SRC_NONE
    s.strs = NULL
    s.cur_idx = 0
    s.cur_pos = 0
    if t.content.n:
        if dtype == DT_STRING:
            if decode_string_spans(t.content, n, NULL) < 0:
                raise CodecError("INTERNAL", f"output {name}: bad string tensor_content")
            s.strs = <Span*>PyMem_Malloc(max(n, 1) * sizeof(Span))
            if s.strs == NULL:
                raise MemoryError()
            decode_string_spans(t.content, n, s.strs)
            s.kind = SRC_STRCONTENT
            s.field = 4
            s.count = n
            return 0
        if t.content.n % ITEMSIZE[dtype] or t.content.n // ITEMSIZE[dtype] != n:
            raise CodecError("INTERNAL", f"output {name}: tensor_content of {t.content.n} bytes")
        s.kind = SRC_BYTES
        s.field = 4
        s.p = t.content.p
        s.n = t.content.n
        s.count = n
        s.eb = ITEMSIZE[dtype]
        return 0
    field = FIELD[dtype]
    per = PER[field]
    if t.comps[field] % per:
        raise CodecError("INTERNAL", f"output {name}: odd number of complex components")
    count = t.comps[field] // per
    if count > n:
        raise CodecError("INTERNAL", f"output {name}: {count} values for {n} elements")
    if count == 0:
        return 0
    if 1 < count < n and n > MAX_FILL_BYTES // max(ITEMSIZE[dtype], 8):
        raise CodecError("INTERNAL", f"output {name}: too large to expand")
    s.field = field
    s.count = count
    if dtype == DT_STRING:
        s.strs = <Span*>PyMem_Malloc(count * sizeof(Span))
        if s.strs == NULL:
            raise MemoryError()
        string_spans(p, end, s.strs, count)
        s.kind = SRC_STRINGS
        return 0
    if t.records[field] == 1 and t.packed[field] == 1:
        s.p = t.single[field].p  # the usual case: one packed record, used in place
        s.n = t.single[field].n
    else:
        gathered = gather_field(p, end, field, t.rawlen[field])
        keep.append(gathered)
        s.p = <const uint8_t*>PyBytes_AS_STRING(gathered)
        s.n = PyBytes_GET_SIZE(gathered)
    if FIELD_WIRE[field] == 0:
        s.kind = SRC_VARINT
        i = s.n - 2  # the last value starts after the previous value's final byte
        while i >= 0 and s.p[i] & 0x80:
            i -= 1
        s.last = s.p + i + 1
        s.last_n = s.n - (i + 1)
    else:
        s.kind = SRC_BYTES
        s.eb = COMP[field] * per
        s.last = s.p + s.n - s.eb
        s.last_n = s.eb
    return 0


cdef int lay_out(Src* s, Piece* pc, int64_t a, int64_t b, int64_t n) except -1:
    """Piece for elements [a, b) of n: which source values, how many fill repeats."""
    cdef int64_t lim, i
    cdef Py_ssize_t start
    pc.off = 0
    pc.n = 0
    pc.rep = 0
    pc.payload = 0
    if s.kind == SRC_NONE or b <= a:
        return 0
    if s.count == 1 and n > 1:
        # The one-value form: the part gets the single value, which fills it alike.
        if s.kind == SRC_STRINGS:
            pc.n = 1
            pc.payload = ld_size(8, s.strs[0].n)
        else:
            pc.n = s.n
            pc.payload = s.n
        return 0
    lim = b if b < s.count else s.count
    if b > s.count:
        pc.rep = b - (a if a > s.count else s.count)
    if s.kind == SRC_BYTES:
        if a < lim:
            pc.off = a * s.eb
            pc.n = (lim - a) * s.eb
        pc.payload = pc.n + pc.rep * s.eb
    elif s.kind == SRC_VARINT:
        if a < lim:
            start = advance_varints(s, a)
            pc.off = start
            pc.n = advance_varints(s, lim) - start
        pc.payload = pc.n + pc.rep * s.last_n
    elif s.kind == SRC_STRINGS:
        if a < lim:
            pc.off = a
            pc.n = lim - a
        for i in range(pc.off, pc.off + pc.n):
            pc.payload += ld_size(8, s.strs[i].n)
        pc.payload += pc.rep * ld_size(8, s.strs[s.count - 1].n)
    else:  # SRC_STRCONTENT
        pc.off = a
        pc.n = b - a
        for i in range(a, b):
            pc.payload += vsize(s.strs[i].n) + s.strs[i].n
    return 0


cdef inline Py_ssize_t payload_field_size(Src* s, Piece* pc) noexcept:
    if pc.payload == 0:
        return 0
    if s.kind == SRC_STRINGS:
        return pc.payload  # records carry their own tags
    return ld_size(s.field, pc.payload)


cdef int w_payload(W* w, Src* s, Piece* pc) except -1:
    cdef int64_t i
    cdef Span last
    if pc.payload == 0:
        return 0
    if s.kind == SRC_STRINGS:
        for i in range(pc.off, pc.off + pc.n):
            w_ld(w, 8, s.strs[i].n)
            w_bytes(w, s.strs[i].p, s.strs[i].n)
        last = s.strs[s.count - 1]
        for i in range(pc.rep):
            w_ld(w, 8, last.n)
            w_bytes(w, last.p, last.n)
        return 0
    w_ld(w, s.field, pc.payload)
    if s.kind == SRC_STRCONTENT:
        for i in range(pc.off, pc.off + pc.n):
            w_varint(w, s.strs[i].n)
        for i in range(pc.off, pc.off + pc.n):
            w_bytes(w, s.strs[i].p, s.strs[i].n)
        return 0
    w_bytes(w, s.p + pc.off, pc.n)
    for i in range(pc.rep):
        w_bytes(w, s.last, s.last_n)
    return 0


cdef int check_batch_dims(TInfo* t, str name) except -1:
    """An output can be cut along dim 0 (FAILED_PRECONDITION otherwise)."""
    cdef Py_ssize_t i
    if t.too_many_dims:
        raise CodecError("INTERNAL", f"output {name} has more than 254 dimensions")
    if t.unknown_rank or t.ndims == 0:
        raise CodecError("FAILED_PRECONDITION", f"output {name} has no batch dimension")
    for i in range(t.ndims):
        if t.dims[i] < 0:
            raise CodecError("FAILED_PRECONDITION", f"output {name} has an unknown dimension")
    if too_large(t):
        raise CodecError("INTERNAL", f"output {name}: {too_large_message(t)}")
    if _itemsize(t.dtype) < 0:
        raise CodecError("FAILED_PRECONDITION",
                         f"output {name} has unbatchable dtype {t.dtype}")
    return 0


cdef list split_response(bytes data, list rows):
    cdef Py_ssize_t nparts = len(rows), nout, j, i, size, klen
    cdef int64_t total = 0, r, per_row, n, a, shape
    cdef bint known
    cdef TInfo* infos = NULL
    cdef Src* srcs = NULL
    cdef Piece* pieces = NULL
    cdef int64_t* row_c = NULL
    cdef const uint8_t* vp
    cdef TInfo* t
    cdef Piece* pc
    cdef bytes vbuf, kb, spec_b, part
    cdef W w
    for value in rows:
        if value < 0:
            raise CodecError("INTERNAL", f"negative row count in {rows}")
        total += <int64_t>value
    entries, spec = read_outputs(data)
    nout = len(entries)
    keep = []
    infos = <TInfo*>PyMem_Malloc(max(nout, 1) * sizeof(TInfo))
    srcs = <Src*>PyMem_Malloc(max(nout, 1) * sizeof(Src))
    pieces = <Piece*>PyMem_Malloc(max(nout * nparts, 1) * sizeof(Piece))
    row_c = <int64_t*>PyMem_Malloc(max(nparts, 1) * sizeof(int64_t))
    if infos == NULL or srcs == NULL or pieces == NULL or row_c == NULL:
        PyMem_Free(infos)
        PyMem_Free(srcs)
        PyMem_Free(pieces)
        PyMem_Free(row_c)
        raise MemoryError()
    for j in range(nout):
        srcs[j].strs = NULL
    try:
        for i in range(nparts):
            row_c[i] = rows[i]
        for j in range(nout):
            name, kb, vbuf, vstart, vstop = entries[j]
            vp = <const uint8_t*>PyBytes_AS_STRING(vbuf)
            t = &infos[j]
            scan_tensor(vp + <Py_ssize_t>vstart, vp + <Py_ssize_t>vstop, t)
            check_batch_dims(t, name)
            if t.dims[0] != total:
                raise CodecError(
                    "FAILED_PRECONDITION",
                    f"output {name} has dimension 0 of {t.dims[0]}, expected {total}",
                )
            t.dims[0] = 1
            per_row = num_elements(t, &known)
            t.dims[0] = total
            n = num_elements(t, &known)
            setup_source(&srcs[j], t, vp + <Py_ssize_t>vstart, vp + <Py_ssize_t>vstop, n,
                         name, keep)
            a = 0
            for i in range(nparts):
                pc = &pieces[j * nparts + i]
                lay_out(&srcs[j], pc, a, a + row_c[i] * per_row, n)
                a += row_c[i] * per_row
                t.dims[0] = row_c[i]
                shape = shape_size(t.ndims, t.dims, t.names)
                pc.tsize = header_size(t.dtype, shape) + payload_field_size(&srcs[j], pc)
        parts = []
        spec_b = spec if spec is not None else b""
        for i in range(nparts):
            size = ld_size(2, PyBytes_GET_SIZE(spec_b)) if spec is not None else 0
            for j in range(nout):
                klen = PyBytes_GET_SIZE(entries[j][1])
                size += ld_size(1, ld_size(1, klen) + ld_size(2, pieces[j * nparts + i].tsize))
            part = w_new(size, &w)
            for j in range(nout):
                t = &infos[j]
                pc = &pieces[j * nparts + i]
                kb = entries[j][1]
                klen = PyBytes_GET_SIZE(kb)
                w_ld(&w, 1, ld_size(1, klen) + ld_size(2, pc.tsize))
                w_ld(&w, 1, klen)
                w_bytes(&w, PyBytes_AS_STRING(kb), klen)
                w_ld(&w, 2, pc.tsize)
                t.dims[0] = row_c[i]
                w_header(&w, t.dtype, t.ndims, t.dims, t.names,
                         shape_size(t.ndims, t.dims, t.names))
                w_payload(&w, &srcs[j], pc)
            if spec is not None:
                w_ld(&w, 2, PyBytes_GET_SIZE(spec_b))
                w_bytes(&w, PyBytes_AS_STRING(spec_b), PyBytes_GET_SIZE(spec_b))
            w_done(&w)
            parts.append(part)
        return parts
    finally:
        for j in range(nout):
            PyMem_Free(srcs[j].strs)
        PyMem_Free(infos)
        PyMem_Free(srcs)
        PyMem_Free(pieces)
        PyMem_Free(row_c)


def split_predict_response(data, rows):
    """Cut a serialized PredictResponse along dim 0 into len(rows) responses of rows[i] rows
    each, keeping the replica's encoding and echoing its model_spec."""
    try:
        return split_response(_as_bytes(data), list(rows))
    except _WireError as exc:
        raise CodecError("INTERNAL", f"Could not parse PredictResponse: {exc}") from None


cdef bytes concat_responses(list datas):
    cdef Py_ssize_t nparts = len(datas), k, i, size = 0
    cdef TInfo* infos = NULL
    cdef TInfo* t
    cdef TInfo* head
    cdef const uint8_t* vp
    cdef bytes vbuf, out, spec_b, kb, tb
    cdef bint ok, typed
    cdef int64_t total, budget
    cdef W w
    tables = [read_outputs(d) for d in datas]  # validates every part first
    maps = [{e[0]: e for e in entries} for entries, _ in tables]
    first_entries, spec = tables[0]
    infos = <TInfo*>PyMem_Malloc(nparts * sizeof(TInfo))
    if infos == NULL:
        raise MemoryError()
    encoded = []
    try:
        for entry in first_entries:
            name = entry[0]
            tensors = []
            typed = True
            chosen = False
            total = 0
            for k in range(nparts):
                e = maps[k].get(name)
                if e is None:
                    raise CodecError("INTERNAL", f"output {name} missing from a part")
                vbuf = e[2]
                vp = <const uint8_t*>PyBytes_AS_STRING(vbuf)
                t = &infos[k]
                scan_tensor(vp + <Py_ssize_t>e[3], vp + <Py_ssize_t>e[4], t)
                check_batch_dims(t, name)
                head = &infos[0]
                same = t.dtype == head.dtype and t.ndims == head.ndims
                for i in range(1, t.ndims if same else 0):
                    same = same and t.dims[i] == head.dims[i]
                if not same:
                    raise CodecError("FAILED_PRECONDITION", f"output {name} differs between parts")
                total += t.dims[0]
                # A part of no rows carries no payload and cannot tell the encoding: the
                # first part that has rows decides.
                if not chosen and t.dims[0]:
                    typed = t.content.n == 0
                    chosen = True
                budget = MAX_FILL_BYTES
                try:
                    tensor = normalize(vp + <Py_ssize_t>e[3], vp + <Py_ssize_t>e[4], t, &ok,
                                       &budget)
                except _Mismatch as exc:
                    raise CodecError("INTERNAL", f"output {name}: {exc}") from None
                if not ok:
                    raise CodecError("INTERNAL", f"output {name} cannot be joined")
                tensors.append((<Tensor>tensor).data)
            head = &infos[0]
            if head.dtype == DT_STRING:
                joined = [s for d in tensors for s in d]
            else:
                joined = b"".join(tensors)
            head.dims[0] = total
            # The head's dim names point into datas[0], alive for the whole call.
            tb = encode_tensor_c(head.dtype, head.ndims, head.dims, head.names, joined, typed)
            kb = entry[1]
            encoded.append((kb, tb))
            size += ld_size(1, ld_size(1, PyBytes_GET_SIZE(kb)) + ld_size(2, PyBytes_GET_SIZE(tb)))
    finally:
        PyMem_Free(infos)
    spec_b = spec if spec is not None else b""
    if spec is not None:
        size += ld_size(2, PyBytes_GET_SIZE(spec_b))
    out = w_new(size, &w)
    for kb, tb in encoded:
        w_ld(&w, 1, ld_size(1, PyBytes_GET_SIZE(kb)) + ld_size(2, PyBytes_GET_SIZE(tb)))
        w_ld(&w, 1, PyBytes_GET_SIZE(kb))
        w_bytes(&w, PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb))
        w_ld(&w, 2, PyBytes_GET_SIZE(tb))
        w_bytes(&w, PyBytes_AS_STRING(tb), PyBytes_GET_SIZE(tb))
    if spec is not None:
        w_ld(&w, 2, PyBytes_GET_SIZE(spec_b))
        w_bytes(&w, PyBytes_AS_STRING(spec_b), PyBytes_GET_SIZE(spec_b))
    w_done(&w)
    return out


def concat_predict_responses(parts):
    """Join responses for consecutive row ranges of one request back into one response,
    along dim 0, in the encoding of the first part (that has rows)."""
    datas = [_as_bytes(p) for p in parts]
    if not datas:
        raise CodecError("INTERNAL", "concat_predict_responses needs at least one part")
    if len(datas) == 1:
        return datas[0]
    try:
        return concat_responses(datas)
    except _WireError as exc:
        raise CodecError("INTERNAL", f"Could not parse PredictResponse: {exc}") from None


# --- JSON text of a numeric tensor (the REST answer) --------------------------------------
#
# TFS writes a predict answer's numbers as orjson writes numpy values: integers in decimal,
# floats in their shortest round-trip form (float32's own for DT_FLOAT) laid out as below.
# Writing them here skips a numpy array and orjson's numpy path for a small answer.

cdef extern from "<stdlib.h>":
    float strtof(const char* s, char** end) nogil
    double strtod(const char* s, char** end) nogil

cdef extern from "<stdio.h>":
    int snprintf(char* s, size_t n, const char* fmt, ...) nogil

cdef extern from "<math.h>":
    bint isfinite(double x) nogil
    bint signbit(double x) nogil
    float nextafterf(float x, float y) nogil
    double floor(double x) nogil
    double log10(double x) nogil
    const float INFINITY

cdef extern from "Python.h":
    char* PyOS_double_to_string(double val, char format_code, int precision, int flags,
                                int* ptype) except NULL

# Where the plain (not exponent) form ends, as a decimal exponent: a value written with
# digits D (no leading or trailing zeros) and point position kk (value = 0.D * 10**kk) is
# plain when LOW <= kk <= HIGH.
cdef enum:
    F32_LOW = -5
    F32_HIGH = 13
    F64_LOW = -4
    F64_HIGH = 16
    # Room for one number's text: 17 digits, sign, point, "e-324", zeros of the plain form.
    NUM_ROOM = 48
    # Room for a float32's exact decimal expansion (at most 112 significant digits).
    EXACT_ROOM = 136


cdef Py_ssize_t _digits_of(const char* text, char* digits, int* kk) noexcept:
    """The significant digits of a decimal text (no sign; "1.5e+16", "0.0001", "123.0")
    into `digits`, and the point position in `kk`; their count (0 for zero)."""
    cdef Py_ssize_t n = 0, before = -1, i = 0
    cdef int ex = 0, sign = 1
    cdef char c
    while True:
        c = text[i]
        if c >= 48 and c <= 57:
            digits[n] = c
            n += 1
        elif c == 46:  # '.'
            before = n
        else:
            break
        i += 1
    if before < 0:
        before = n
    if c == 101 or c == 69:  # 'e'
        i += 1
        if text[i] == 45:
            sign = -1
            i += 1
        elif text[i] == 43:
            i += 1
        while text[i] >= 48 and text[i] <= 57:
            ex = ex * 10 + (text[i] - 48)
            i += 1
    cdef Py_ssize_t lead = 0
    while lead < n and digits[lead] == 48:
        lead += 1
    while n > lead and digits[n - 1] == 48:
        n -= 1
    if n == lead:
        return 0
    if lead:
        memcpy(digits, digits + lead, n - lead)
    kk[0] = <int>(before - lead) + sign * ex
    return n - lead


cdef Py_ssize_t _lay_out(char* out, bint negative, const char* digits, Py_ssize_t n, int kk,
                         int low, int high) noexcept:
    """A number from its digits and point position, in orjson's layout: "123.0", "1.25",
    "0.0001", "1e+16", "1.5e-7"."""
    cdef Py_ssize_t w = 0, i
    cdef int e
    cdef char exp_text[8]
    if negative:
        out[w] = 45
        w += 1
    if low <= kk <= 0:
        out[w] = 48
        out[w + 1] = 46
        w += 2
        for i in range(-kk):
            out[w] = 48
            w += 1
        memcpy(out + w, digits, n)
        return w + n
    if 0 < kk <= high:
        if kk >= n:
            memcpy(out + w, digits, n)
            w += n
            for i in range(kk - n):
                out[w] = 48
                w += 1
            out[w] = 46
            out[w + 1] = 48
            return w + 2
        memcpy(out + w, digits, kk)
        w += kk
        out[w] = 46
        w += 1
        memcpy(out + w, digits + kk, n - kk)
        return w + n - kk
    out[w] = digits[0]
    w += 1
    if n > 1:
        out[w] = 46
        w += 1
        memcpy(out + w, digits + 1, n - 1)
        w += n - 1
    e = kk - 1
    out[w] = 101
    w += 1
    if e >= 0:
        out[w] = 43
        w += 1
    return w + snprintf(out + w, 8, "%d", e)


cdef Py_ssize_t _write_double(char* out, double v) except -2:
    """v's shortest round-trip form (repr's digits); -1 when v is not finite."""
    cdef char digits[NUM_ROOM]
    cdef int kk = 0
    cdef Py_ssize_t n
    cdef char* text
    if not isfinite(v):
        return -1
    if v == 0:
        memcpy(out, b"-0.0" if signbit(v) else b"0.0", 4 if signbit(v) else 3)
        return 4 if signbit(v) else 3
    text = PyOS_double_to_string(v if v > 0 else -v, b'r', 0, 0, NULL)
    n = _digits_of(text, digits, &kk)
    PyMem_Free(text)
    return _lay_out(out, v < 0, digits, n, kk, F64_LOW, F64_HIGH)


cdef double _POW10[23]  # 1e0 .. 1e22: exact as doubles
_POW10[0] = 1.0
for _i in range(1, 23):
    _POW10[_i] = _POW10[_i - 1] * 10.0


cdef bint _reads_back(float a, uint64_t d, int q) noexcept:
    """Whether the decimal d * 10**q reads back as the float32 `a`, as strtof would read
    it. With |q| <= 22 the double nearest the decimal is one exact operation away, and its
    rounding to float32 is the decimal's own unless it lies exactly half way between two
    float32 values (then the decimal's side is unknown: strtof decides)."""
    cdef char text[NUM_ROOM]
    cdef double x
    cdef float f, g
    cdef double half
    if -22 <= q <= 22:
        x = <double>d * _POW10[q] if q >= 0 else <double>d / _POW10[-q]
        f = <float>x
        if <double>f == x:
            return f == a
        g = nextafterf(f, INFINITY if <double>f < x else 0.0)
        half = (<double>f + <double>g) * 0.5
        if x != half:
            return f == a
    snprintf(text, NUM_ROOM, "%llue%d", <unsigned long long>d, q)
    return strtof(text, NULL) == a


cdef bint _try_digits(float a, Py_ssize_t p, const char* exact, Py_ssize_t exact_n,
                      int exact_kk, uint64_t* d) noexcept:
    """Whether a p-digit decimal reads back as the float32 `a` (> 0), given a's digits
    `exact` (enough of them that rounding them to p digits rounds `a` itself: see
    _write_float); if so, its digits as an integer in `d` (value d * 10**(exact_kk - p)).
    The candidate is the p-digit decimal nearest `a` or, where that lies below `a` and
    fails, the next one up: below a power of two the values that read back as `a` span
    half as far as above it, so the nearest can fail where the next one up does not."""
    cdef Py_ssize_t i
    cdef uint64_t v = 0
    cdef bint up
    for i in range(p):
        v = v * 10 + (<uint64_t>(exact[i] - 48) if i < exact_n else 0)
    # Exactly half way only where `exact` is a's exact expansion: then to the even digit.
    up = p < exact_n and exact[p] >= 53 and (exact[p] > 53 or exact_n > p + 1 or v % 2 == 1)
    if up:
        v += 1
    if _reads_back(a, v, exact_kk - <int>p):
        d[0] = v
        return True
    if up:
        return False  # the nearest lies above and fails: so does any other
    v += 1
    if _reads_back(a, v, exact_kk - <int>p):
        d[0] = v
        return True
    return False


cdef int _try_scaled(float a, int p, int* e10, uint64_t* d) noexcept:
    """_try_digits with double arithmetic, for `a` (> 0) within 1e-14..1e22: the nearest
    p-digit decimal is a * 10**(p - e10) rounded to an integer, where 10**(e10 - 1) <= a <
    10**e10 (e10 is corrected here when the estimate was off). That product, one exact
    power of ten away, is within 2**-53 of itself: 1 and 0 as _try_digits, and -1 where it
    lies too near half way between two integers to tell which is nearer."""
    cdef int s, tries
    cdef double y, t, frac
    cdef uint64_t v
    cdef bint up
    for tries in range(3):
        s = p - e10[0]
        if s < -22 or s > 22:
            return -1
        y = <double>a * _POW10[s] if s >= 0 else <double>a / _POW10[-s]
        if y >= _POW10[p]:
            e10[0] += 1
        elif y < _POW10[p - 1] - 0.5:
            e10[0] -= 1
        else:
            break
    else:
        return -1
    t = floor(y)
    frac = y - t
    if 0.4999 < frac < 0.5001:
        return -1
    v = <uint64_t>t
    up = frac > 0.5
    if up:
        v += 1
    if _reads_back(a, v, -s):
        d[0] = v
        return 1
    if up:
        return 0  # the nearest lies above and fails: so does any other
    v += 1
    if _reads_back(a, v, -s):
        d[0] = v
        return 1
    return 0


cdef Py_ssize_t _write_float(char* out, float v) except -2:
    """v's shortest form that reads back as the same float32 (ryu's digits, as orjson
    writes them); -1 when v is not finite. By double arithmetic where it can tell (see
    _try_scaled), else from decimal expansions (_write_float_exact)."""
    cdef char digits[NUM_ROOM]
    cdef int e10, low = 1, high = 9, p = 8, r, q = 0, best_q = 0, kk
    cdef uint64_t d = 0, best_d = 0
    cdef Py_ssize_t n
    cdef float a = v if v > 0 else -v
    if not isfinite(v):
        return -1
    if v == 0:
        memcpy(out, b"-0.0" if signbit(v) else b"0.0", 4 if signbit(v) else 3)
        return 4 if signbit(v) else 3
    if not (1e-14 <= a <= 1e22):
        return _write_float_exact(out, v)
    e10 = <int>floor(log10(<double>a)) + 1
    # The fewest digits that read back (nine always do; if p do, so do p + 1): bisection,
    # tried at 8 first, where most float32 values land.
    while low < high:
        r = _try_scaled(a, p, &e10, &d)
        if r < 0:
            return _write_float_exact(out, v)
        if r:
            best_d, best_q, high = d, e10 - p, p
        else:
            low = p + 1
        p = (low + high) // 2
    if best_d == 0 or best_q != e10 - low:
        if _try_scaled(a, low, &e10, &best_d) != 1:
            return _write_float_exact(out, v)
        best_q = e10 - low
    # As digits again: best_d * 10**best_q.
    n = snprintf(digits, NUM_ROOM, "%llu", <unsigned long long>best_d)
    kk = best_q + <int>n
    while n > 1 and digits[n - 1] == 48:
        n -= 1
    return _lay_out(out, v < 0, digits, n, kk, F32_LOW, F32_HIGH)


cdef Py_ssize_t _write_float_exact(char* out, float v) except -2:
    """_write_float from decimal expansions, for any finite nonzero v."""
    cdef char exact[EXACT_ROOM]
    cdef char digits[NUM_ROOM]
    cdef int kk = 0, exact_kk = 0
    cdef Py_ssize_t n, p, low, high, best_p = 0
    cdef uint64_t d = 0, best_d = 0
    cdef float a = v if v > 0 else -v
    cdef char* text
    # The double's shortest digits. Seven or fewer: they are float32's too (a shorter
    # decimal is at least one unit of the 7th digit away, more than half a float32 step).
    text = PyOS_double_to_string(<double>a, b'r', 0, 0, NULL)
    n = _digits_of(text, exact, &exact_kk)
    PyMem_Free(text)
    if n <= 7:
        return _lay_out(out, v < 0, exact, n, exact_kk, F32_LOW, F32_HIGH)
    # Rounding those digits to p rounds `a` itself when there are at least p + 2 of them:
    # a halfway point (p + 1 digits) between them and `a` would be a shorter decimal that
    # reads back as the same double. With fewer, a's exact expansion (a float32 has at most
    # 112 significant decimal digits).
    if n < 11:
        text = PyOS_double_to_string(<double>a, b'e', EXACT_ROOM - 16, 0, NULL)
        n = _digits_of(text, exact, &exact_kk)
        PyMem_Free(text)
    # The fewest digits that read back (nine always do; if p do, so do p + 1): bisection,
    # tried at 8 first, where most float32 values land.
    low, high = 1, 9
    p = 8
    while low < high:
        if _try_digits(a, p, exact, n, exact_kk, &d):
            best_d, best_p, high = d, p, p
        else:
            low = p + 1
        p = (low + high) // 2
    if best_p != low:
        _try_digits(a, low, exact, n, exact_kk, &best_d)
        best_p = low
    # As digits again: best_d * 10**(exact_kk - best_p), best_d of best_p digits or, where
    # rounding up carried, one more.
    n = snprintf(digits, NUM_ROOM, "%llu", <unsigned long long>best_d)
    kk = exact_kk - <int>best_p + <int>n
    while n > 1 and digits[n - 1] == 48:
        n -= 1
    return _lay_out(out, v < 0, digits, n, kk, F32_LOW, F32_HIGH)


cdef Py_ssize_t _write_int(char* out, const uint8_t* src, int dtype) noexcept:
    if dtype == DT_UINT64:
        return snprintf(out, NUM_ROOM, "%llu", (<const unsigned long long*>src)[0])
    cdef long long v
    if dtype == DT_INT64:
        v = (<const long long*>src)[0]
    elif dtype == DT_INT32:
        v = (<const int32_t*>src)[0]
    elif dtype == DT_UINT32:
        v = (<const uint32_t*>src)[0]
    elif dtype == DT_INT16:
        v = (<const int16_t*>src)[0]
    elif dtype == DT_INT8:
        v = (<const int8_t*>src)[0]
    else:  # DT_UINT8
        v = src[0]
    return snprintf(out, NUM_ROOM, "%lld", v)


cdef inline int _json_size(int dtype) noexcept:
    """Bytes per element of the dtypes json_numbers writes; 0 for the others."""
    if dtype == DT_DOUBLE or dtype == DT_INT64 or dtype == DT_UINT64:
        return 8
    if dtype == DT_FLOAT or dtype == DT_INT32 or dtype == DT_UINT32:
        return 4
    if dtype == DT_INT16:
        return 2
    if dtype == DT_INT8 or dtype == DT_UINT8 or dtype == DT_BOOL:
        return 1
    return 0


def json_numbers(int dtype, tuple shape, data):
    """JSON text of a numeric tensor, nested by shape; None when this writer does not
    write it (see _core.pyi)."""
    cdef int size = _json_size(dtype)
    cdef Py_ssize_t ndim = len(shape), count = 1, i, k, w = 0, n
    cdef int64_t blocks[MAX_RANK]
    if size == 0 or ndim > MAX_RANK or type(data) is not bytes:
        return None
    cdef bytes buf = <bytes>data
    cdef Py_ssize_t have = PyBytes_GET_SIZE(buf) // size
    for k in range(ndim - 1, -1, -1):
        # Past the payload's own element count, no shape can match it (and no product
        # of client-sized dimensions can overflow).
        if not 0 < shape[k] <= have or count * <Py_ssize_t>shape[k] > have:
            return None
        count *= <Py_ssize_t>shape[k]
        blocks[k] = count
    if PyBytes_GET_SIZE(buf) != count * size:
        return None
    cdef const uint8_t* src = <const uint8_t*>PyBytes_AS_STRING(buf)
    # Every element: its text, a comma, and up to one bracket a level on either side.
    cdef Py_ssize_t room = count * (NUM_ROOM + 1 + 2 * ndim) + 1
    cdef char* out = <char*>PyMem_Malloc(room)
    if out == NULL:
        raise MemoryError()
    try:
        for i in range(count):
            if i:
                out[w] = 44  # ','
                w += 1
            for k in range(ndim):
                if i % blocks[k] == 0:
                    out[w] = 91  # '['
                    w += 1
            if dtype == DT_FLOAT:
                n = _write_float(out + w, (<const float*>src)[i])
            elif dtype == DT_DOUBLE:
                n = _write_double(out + w, (<const double*>src)[i])
            elif dtype == DT_BOOL:
                if src[i]:
                    memcpy(out + w, b"true", 4)
                    n = 4
                else:
                    memcpy(out + w, b"false", 5)
                    n = 5
            else:
                n = _write_int(out + w, src + i * size, dtype)
            if n < 0:
                return None  # NaN or an infinity: TFS spells them out, the caller's path
            w += n
            for k in range(ndim - 1, -1, -1):
                if (i + 1) % blocks[k] == 0:
                    out[w] = 93  # ']'
                    w += 1
        return PyBytes_FromStringAndSize(out, w)
    finally:
        PyMem_Free(out)


# Last, so that the dtypes import (which runs the codec selector) sees every name above.
_fill_tables()
