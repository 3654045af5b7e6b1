// A vector of trivially copyable values with inline storage for up to N of them (torch-free): the small
// per-call vectors of the CPU ops (filters, statistics, moments) without a heap allocation each, which
// at host-bound shapes cost more than the arithmetic. Longer vectors go to the heap. Values are
// uninitialised unless a fill value is given.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <utility>

namespace cmpe_se {
namespace cpu {

template <class T, size_t N = 96>
class SmallVec {
 public:
  SmallVec() = default;
  explicit SmallVec(size_t n, const T& v = T()) { assign(n, v); }
  template <class It, class = decltype(*std::declval<It>())>
  SmallVec(It first, It last) {
    reset(static_cast<size_t>(last - first));
    std::copy(first, last, p_);
  }
  SmallVec(const SmallVec& o) { *this = o; }
  SmallVec(SmallVec&& o) noexcept { take(o); }
  SmallVec& operator=(const SmallVec& o) {
    if (this != &o) {
      reset(o.n_);
      std::copy(o.begin(), o.end(), p_);
    }
    return *this;
  }
  SmallVec& operator=(SmallVec&& o) noexcept {
    if (this != &o) take(o);
    return *this;
  }

  void assign(size_t n, const T& v) {
    reset(n);
    std::fill(p_, p_ + n, v);
  }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }
  T* begin() { return p_; }
  T* end() { return p_ + n_; }
  const T* begin() const { return p_; }
  const T* end() const { return p_ + n_; }

 private:
  void reset(size_t n) {  // room for n values (contents undefined)
    if (n > N) {
      if (!heap_ || n > cap_) {
        heap_.reset(new T[n]);
        cap_ = n;
      }
      p_ = heap_.get();
    } else {
      p_ = inline_;
    }
    n_ = n;
  }
  void take(SmallVec& o) {
    if (o.p_ == o.inline_) {
      std::copy(o.inline_, o.inline_ + o.n_, inline_);
      p_ = inline_;
    } else {
      heap_ = std::move(o.heap_);
      cap_ = o.cap_;
      p_ = heap_.get();
    }
    n_ = o.n_;
    o.n_ = 0;
    o.cap_ = 0;
    o.p_ = o.inline_;
  }

  T inline_[N];
  std::unique_ptr<T[]> heap_;
  size_t cap_ = 0;
  T* p_ = inline_;
  size_t n_ = 0;
};

}  // namespace cpu
}  // namespace cmpe_se
