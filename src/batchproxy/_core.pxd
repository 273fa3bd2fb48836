# cython: language_level=3
"""Declarations of the compiled core (`_core.pyx` holds the code): wire and dtype constants,
the structs the readers and writers share, the extension types' fields and the per-dtype
tables. The tables' contents come from `codec/dtypes.py` when the module initializes."""

from libc.stdint cimport (
    int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t,
)

cdef enum:
    MAX_RANK = 254  # TensorShape::MaxDimensions(): TF refuses a shape with more
    NFIELDS = 18  # TensorProto field numbers 0..17
    NDTYPES = 24  # rows of dtypes.DATA_TYPES (values 0..23)
    # dtypes the code names (checked against dtypes.py when the module initializes)
    DT_FLOAT = 1
    DT_DOUBLE = 2
    DT_INT32 = 3
    DT_UINT8 = 4
    DT_INT16 = 5
    DT_INT8 = 6
    DT_STRING = 7
    DT_COMPLEX64 = 8
    DT_INT64 = 9
    DT_BOOL = 10
    DT_COMPLEX128 = 18
    DT_UINT32 = 22
    DT_UINT64 = 23
    # element conversions for the varint fields (see elem_varint / _put_elem)
    VK_S8 = 1
    VK_U8 = 2
    VK_S16 = 3
    VK_U16 = 4
    VK_S32 = 5
    VK_U32 = 6
    VK_64 = 7
    VK_BOOL = 8

cdef int64_t MAX_FILL_BYTES
cdef int64_t MAX_ELEMENTS
cdef int64_t SATURATED

# --- per-dtype and per-field tables (filled by _fill_tables) -------------------------------

cdef int ITEMSIZE[NDTYPES]  # bytes per element; 0 STRING; -1 not batchable
cdef int FIELD[NDTYPES]  # the typed TensorProto field TF reads for the dtype
cdef int VKIND[NDTYPES]  # how a varint field's value maps to the element
cdef int FIELD_WIRE[NFIELDS]  # element wire type of typed fields 5..17 (-1: not one)
cdef int COMP[NFIELDS]  # bytes per component of the fixed-width fields
cdef int PER[NFIELDS]  # components per element (2 for the complex fields)

# --- extension types ------------------------------------------------------------------------

cdef class Tensor:
    cdef public int dtype
    cdef public tuple shape
    cdef public object data


cdef class PredictCall:
    cdef public str model_name
    cdef public object version
    cdef public object version_label
    cdef public str signature_name
    cdef public tuple output_filter
    cdef public bytes model_spec
    cdef public dict inputs
    cdef public Py_ssize_t rows
    cdef public tuple key

# --- reading ---------------------------------------------------------------------------------

cdef struct Span:
    const uint8_t* p
    Py_ssize_t n

# What one scan of a serialized TensorProto learns. Values are gathered by a second pass
# once the dtype (which may come last on the wire) is known.
cdef struct TInfo:
    int32_t dtype
    bint unknown_rank
    bint too_many_dims
    Py_ssize_t ndims
    int64_t dims[MAX_RANK]
    Span names[MAX_RANK]
    Span content  # the last tensor_content record (n may be 0)
    Py_ssize_t comps[NFIELDS]  # components of each typed field (string_val: records)
    Py_ssize_t records[NFIELDS]  # records of each typed field, packed or not
    Py_ssize_t packed[NFIELDS]  # ... of which packed
    Py_ssize_t rawlen[NFIELDS]  # bytes of the values (packed payloads, unpacked elements)
    Span single[NFIELDS]  # the last packed payload (all of it when records == packed == 1)

# --- writing ---------------------------------------------------------------------------------

cdef struct W:
    uint8_t* p
    uint8_t* end

# Where each part's payload for one output comes from.
cdef enum:
    SRC_NONE = 0  # no values: parts carry none either (TF reads zeros)
    SRC_BYTES = 1  # fixed-width slices: tensor_content, or a packed fixed field
    SRC_VARINT = 2  # a packed varint field: cut at element boundaries, bytes copied as is
    SRC_STRINGS = 3  # string_val records
    SRC_STRCONTENT = 4  # TF's string tensor_content encoding


cdef struct Src:
    int kind
    int field  # the field the parts' payload goes in
    const uint8_t* p  # contiguous source values (SRC_BYTES / SRC_VARINT)
    Py_ssize_t n
    int64_t count  # values in the source
    Py_ssize_t eb  # bytes per element (SRC_BYTES)
    const uint8_t* last  # the last element's bytes (the fill rule repeats it)
    Py_ssize_t last_n
    Span* strs  # SRC_STRINGS / SRC_STRCONTENT elements (PyMem)
    # the cursor over SRC_VARINT as parts are laid out in order
    int64_t cur_idx
    Py_ssize_t cur_pos


cdef struct Piece:
    Py_ssize_t off  # SRC_BYTES/VARINT: source byte offset; strings: first element
    Py_ssize_t n  # SRC_BYTES/VARINT: source bytes; strings: elements
    int64_t rep  # copies of the last element appended (TF's fill rule)
    Py_ssize_t payload  # bytes of the payload field's content
    Py_ssize_t tsize  # the part's TensorProto size

