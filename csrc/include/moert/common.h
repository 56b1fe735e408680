// Shared error type and argument checks. Every public entry point validates its arguments with
// MOERT_CHECK so that bad input from Python becomes a ValueError naming the value, never a crash.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

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
inline void format_into(std::ostringstream&) {}
template <typename T, typename... Rest>
void format_into(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  format_into(os, rest...);
}
}  // namespace detail

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  detail::format_into(os, args...);
  return os.str();
}

}  // namespace moert

// MOERT_CHECK(cond, "message parts", value, ...): throws ArgumentError with the parts joined.
#define MOERT_CHECK(cond, ...)                                            \
  do {                                                                    \
    if (!(cond)) throw ::moert::ArgumentError(::moert::cat(__VA_ARGS__)); \
  } while (0)
