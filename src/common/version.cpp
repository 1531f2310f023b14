#include "common/version.hpp"

// Defined for this one file by CMakeLists.txt, so that a new version recompiles nothing else.
#ifndef NANSCOPE_VERSION
#error "NANSCOPE_VERSION is set by CMakeLists.txt"
#endif

namespace nanscope {

const char* version() {
  return NANSCOPE_VERSION;
}

}  // namespace nanscope
