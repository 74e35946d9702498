// A minimal test harness for the torch-free C++ core (no gtest: CI builds offline).
//
//   TEST(name) {
//     CHECK(cond);
//     CHECK_EQ(a, b);
//     CHECK_THROWS(expr, std::invalid_argument);
//     CHECK_THROWS_WITH(expr, std::invalid_argument, "text in what()");
//   }
//   int main() { return pyruntime_test::run_all(); }
//
// A failed check prints file:line and the expression, counts the failure and lets the test
// continue, so one run reports every broken expectation. run_all() returns non-zero when any
// check failed, which is what ctest looks at.
#pragma once

#include <exception>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace pyruntime_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

inline void report(const char* file, int line, const std::string& what) {
  ++failures();
  std::cerr << file << ":" << line << ": FAILED: " << what << "\n";
}

// Runs every TEST; an exception escaping a test counts as one failure of that test.
inline int run_all() {
  for (auto& [name, fn] : registry()) {
    int before = failures();
    try {
      fn();
    } catch (const std::exception& e) {
      ++failures();
      std::cerr << "TEST(" << name << "): FAILED: unexpected exception: " << e.what() << "\n";
    }
    std::cout << (failures() == before ? "[ ok ] " : "[FAIL] ") << name << "\n";
  }
  std::cout << registry().size() << " tests, " << failures() << " failed checks\n";
  return failures() == 0 ? 0 : 1;
}

}  // namespace pyruntime_test

#define TEST(name)                                                                  \
  static void name();                                                               \
  static const pyruntime_test::Registrar name##_registrar(#name, name);             \
  static void name()

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) pyruntime_test::report(__FILE__, __LINE__, "CHECK(" #cond ")");    \
  } while (0)

// Operands are evaluated once and must be printable with operator<<.
#define CHECK_EQ(a, b)                                                              \
  do {                                                                              \
    const auto& check_a_ = (a);                                                     \
    const auto& check_b_ = (b);                                                     \
    if (!(check_a_ == check_b_)) {                                                  \
      std::ostringstream check_msg_;                                                \
      check_msg_ << "CHECK_EQ(" #a ", " #b "): " << check_a_ << " != " << check_b_; \
      pyruntime_test::report(__FILE__, __LINE__, check_msg_.str());                 \
    }                                                                               \
  } while (0)

// Passes when `expr` throws exception_type (or a subclass) whose what() contains `text`;
// a different exception, a different message or no exception is a failure.
#define CHECK_THROWS_WITH(expr, exception_type, text)                               \
  do {                                                                              \
    std::string check_got_ = "no exception";                                        \
    bool check_ok_ = false;                                                         \
    try {                                                                           \
      (void)(expr);                                                                 \
    } catch (const exception_type& e) {                                             \
      check_got_ = e.what();                                                        \
      check_ok_ = check_got_.find(text) != std::string::npos;                       \
    } catch (...) {                                                                 \
      check_got_ = "an exception of another type";                                  \
    }                                                                               \
    if (!check_ok_) {                                                               \
      pyruntime_test::report(__FILE__, __LINE__, "CHECK_THROWS(" #expr ", " #exception_type \
                             ", \"" + std::string(text) + "\"): got " + check_got_);    \
    }                                                                               \
  } while (0)

#define CHECK_THROWS(expr, exception_type) CHECK_THROWS_WITH(expr, exception_type, "")
