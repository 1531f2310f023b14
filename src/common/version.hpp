// nanscope's version, from project(VERSION) in CMakeLists.txt (one place to change it).
#pragma once

namespace nanscope {

const char* version();  // "0.1.0"

}  // namespace nanscope
