/*
 * Word tests over SQL text, shared by the frame scanner (_scanner.c) and the compiled relay (../_relay.c):
 * the relay asks the same question of a Query on its way as FrameScanner's consumers ask in Python.
 * The regexes in proxy/protocol/sql_words.py are the reference; tests compare both.
 */
#ifndef PGMUX_WORDS_H
#define PGMUX_WORDS_H

#include <Python.h>

/* What a byte may be to the word tests (GNU range initializers, as gcc and clang take them). */
#define WORD_BYTE 1   /* a word character: what \b means in a bytes regex */
#define WORD_FIRST 2  /* the first letter, in either case, of a word the test looks for at a word's start */
#define WORD_A 4      /* "a" or "A": "advisory" counts inside a word too (pg_advisory_lock) */

static const unsigned char word_classes[256] = {
    ['0' ... '9'] = WORD_BYTE,
    ['A' ... 'Z'] = WORD_BYTE,
    ['a' ... 'z'] = WORD_BYTE,
    ['_'] = WORD_BYTE,
    ['A'] = WORD_BYTE | WORD_A, ['a'] = WORD_BYTE | WORD_A,
    ['C'] = WORD_BYTE | WORD_FIRST, ['c'] = WORD_BYTE | WORD_FIRST,
    ['D'] = WORD_BYTE | WORD_FIRST, ['d'] = WORD_BYTE | WORD_FIRST,
    ['L'] = WORD_BYTE | WORD_FIRST, ['l'] = WORD_BYTE | WORD_FIRST,
    ['P'] = WORD_BYTE | WORD_FIRST, ['p'] = WORD_BYTE | WORD_FIRST,
    ['R'] = WORD_BYTE | WORD_FIRST, ['r'] = WORD_BYTE | WORD_FIRST,
    ['S'] = WORD_BYTE | WORD_FIRST, ['s'] = WORD_BYTE | WORD_FIRST,
    ['T'] = WORD_BYTE | WORD_FIRST, ['t'] = WORD_BYTE | WORD_FIRST,
    ['U'] = WORD_BYTE | WORD_FIRST, ['u'] = WORD_BYTE | WORD_FIRST,
};

/* ASCII word characters: what \b means in a bytes regex. */
static inline int
is_word_byte(unsigned char c)
{
    return word_classes[c] & WORD_BYTE;
}

/* `word` (lower case letters) at s[i], in any case, ending at a word boundary. */
static inline int
word_at(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, const char *word, Py_ssize_t length)
{
    if (i + length > n)
        return 0;
    for (Py_ssize_t k = 0; k < length; k++) {
        /* | 0x20 folds A-Z onto a-z; no other byte folds onto a letter. */
        if ((s[i + k] | 0x20) != (unsigned char)word[k])
            return 0;
    }
    return i + length == n || !is_word_byte(s[i + length]);
}

/* `word` (lower case letters and "_") at s[i], letters in any case, whatever follows it. */
static inline int
prefix_at(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, const char *word, Py_ssize_t length)
{
    if (i + length > n)
        return 0;
    for (Py_ssize_t k = 0; k < length; k++) {
        unsigned char expected = (unsigned char)word[k];
        unsigned char c = expected == '_' ? s[i + k] : (s[i + k] | 0x20);
        if (c != expected)
            return 0;
    }
    return 1;
}

static inline int
is_sql_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Whether the word SET at s[i] stands where a statement may begin: after the text's start (`start`), a
   character that is neither a word's nor an identifier quote (";", "(", a comment's "/"), or a line break. */
static inline int
set_may_begin_statement(const unsigned char *s, Py_ssize_t i, Py_ssize_t start)
{
    Py_ssize_t k = i - 1;
    while (k >= start && is_sql_space(s[k])) {
        if (s[k] == '\n')
            return 1;
        k--;
    }
    return k < start || !(is_word_byte(s[k]) || s[k] == '"');
}


/* Whether a session-state word begins at s[i], a word's first letter (one of WORD_FIRST) where a word starts. */
static inline int
session_word_at(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t start)
{
    switch (s[i] | 0x20) {
    case 'r':
        return word_at(s, i, n, "reset", 5);
    case 'd':
        return word_at(s, i, n, "discard", 7) || word_at(s, i, n, "deallocate", 10) || word_at(s, i, n, "declare", 7);
    case 'l':
        return word_at(s, i, n, "listen", 6) || word_at(s, i, n, "load", 4);
    case 'u':
        return word_at(s, i, n, "unlisten", 8);
    case 'p':
        return word_at(s, i, n, "prepare", 7) || prefix_at(s, i, n, "pg_temp", 7);
    case 'c':
        return word_at(s, i, n, "close", 5);
    case 't':
        return word_at(s, i, n, "temp", 4) || word_at(s, i, n, "temporary", 9);
    case 's':
        return prefix_at(s, i, n, "set_config", 10) || (word_at(s, i, n, "set", 3) && set_may_begin_statement(s, i, start));
    default:
        return 0;
    }
}

/* The test at s[i], one byte at a time: an "a" anywhere, a first letter where a word starts. */
static inline int
session_state_at(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t start)
{
    unsigned char what = word_classes[s[i]];
    if (what & WORD_A)
        return prefix_at(s, i, n, "advisory", 8);
    if (!(what & WORD_FIRST) || (i > start && is_word_byte(s[i - 1])))
        return 0;
    return session_word_at(s, i, n, start);
}

#if defined(__SSE2__)
#include <emmintrin.h>

/* 16 bytes at once: bit k set where s[k] is a word character, an "a", or a WORD_FIRST letter. */
static inline void
classify_16(const unsigned char *s, unsigned *word, unsigned *a, unsigned *first)
{
    __m128i bytes = _mm_loadu_si128((const __m128i *)s);
    __m128i folded = _mm_or_si128(bytes, _mm_set1_epi8(0x20));  /* A-Z onto a-z; nothing else onto a letter */
    /* Unsigned ranges as signed compares: shifted so that the range begins at -128. */
    __m128i letter = _mm_cmplt_epi8(_mm_add_epi8(folded, _mm_set1_epi8((char)(0x80 - 'a'))),
                                    _mm_set1_epi8((char)(0x80 + 26)));
    __m128i digit = _mm_cmplt_epi8(_mm_add_epi8(bytes, _mm_set1_epi8((char)(0x80 - '0'))),
                                   _mm_set1_epi8((char)(0x80 + 10)));
    __m128i underscore = _mm_cmpeq_epi8(bytes, _mm_set1_epi8('_'));
    *word = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(letter, digit), underscore));
    *a = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(folded, _mm_set1_epi8('a')));
    __m128i firsts = _mm_or_si128(
        _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(folded, _mm_set1_epi8('c')), _mm_cmpeq_epi8(folded, _mm_set1_epi8('d'))),
                     _mm_or_si128(_mm_cmpeq_epi8(folded, _mm_set1_epi8('l')), _mm_cmpeq_epi8(folded, _mm_set1_epi8('p')))),
        _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(folded, _mm_set1_epi8('r')), _mm_cmpeq_epi8(folded, _mm_set1_epi8('s'))),
                     _mm_or_si128(_mm_cmpeq_epi8(folded, _mm_set1_epi8('t')), _mm_cmpeq_epi8(folded, _mm_set1_epi8('u')))));
    *first = (unsigned)_mm_movemask_epi8(firsts);
}
#endif

/* The session-state words of sql_words.mentions_session_state_python in a whole Query or Parse message
   `s` of `n` bytes (its 5-byte header is skipped). Every Query and Parse the relay passes is read here: with
   SSE2, 16 bytes are classified at once and only an "a", or a first letter where a word starts, is looked at
   (about 4 instructions a byte, against 18 one byte at a time). */
static inline int
session_state_in(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t start = 5, i = start;
#if defined(__SSE2__)
    unsigned after_word = 0;  /* the byte before the block is a word character (never so before `start`) */
    for (; i + 16 <= n; i += 16) {
        unsigned word, a, first;
        classify_16(s + i, &word, &a, &first);
        unsigned starts = word & ~((word << 1) | after_word);
        unsigned candidates = (starts & first) | a;
        while (candidates) {
            Py_ssize_t k = i + __builtin_ctz(candidates);
            candidates &= candidates - 1;
            if (word_classes[s[k]] & WORD_A ? prefix_at(s, k, n, "advisory", 8) : session_word_at(s, k, n, start))
                return 1;
        }
        after_word = (word >> 15) & 1;
    }
#endif
    for (; i < n; i++) {
        if (session_state_at(s, i, n, start))
            return 1;
    }
    return 0;
}

#endif
