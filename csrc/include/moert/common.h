// Shared error type and argument checks. Every public entry point validates its arguments with
// MOERT_CHECK so that bad input from Python becomes a ValueError naming the value, never a crash.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace moert {

// Bad argument from the caller; bindings.cc maps it to ValueError.
class ArgumentError : public std::invalid_argument {
 public:
  explicit ArgumentError(const std::string& what) : std::invalid_argument(what) {}
};

// The runtime cannot do what was asked (no device, object closed, CUDA failure); RuntimeError.
class RuntimeFailure : public std::runtime_error {
 public:
  explicit RuntimeFailure(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
// Messages are built without iostreams: an ostringstream consults the process's global locale,
// and where moert._C carries its own copy of libstdc++ (a toolchain that links it statically, as
// on one GPU image) that locale belongs to another copy and formatting a number crashes.
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? '1' : '0'; }  // as an ostream prints it
template <typename T>
std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>>
append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename T>
std::enable_if_t<std::is_floating_point_v<T>> append(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));  // an ostream's default format
  s += buf;
}
}  // namespace detail

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace moert

// MOERT_CHECK(cond, "message parts", value, ...): throws ArgumentError with the parts joined.
#define MOERT_CHECK(cond, ...)                                            \
  do {                                                                    \
    if (!(cond)) throw ::moert::ArgumentError(::moert::cat(__VA_ARGS__)); \
  } while (0)
