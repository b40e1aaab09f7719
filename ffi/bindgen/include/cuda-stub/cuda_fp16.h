/* Empty stand-in (ffi/bindgen/regenerate.sh): nccl.h includes it, the bound functions use none of it. */
