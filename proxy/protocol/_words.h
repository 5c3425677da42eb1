/*
 * Word tests over SQL text, shared by the frame scanner (_scanner.c) and the compiled relay (../_relay.c):
 * the relay asks the same question of a Query on its way as FrameScanner's consumers ask in Python.
 * The regexes in proxy/protocol/sql_words.py are the reference; tests compare both.
 */
#ifndef PGMUX_WORDS_H
#define PGMUX_WORDS_H

#include <Python.h>

/* ASCII word characters: what \b means in a bytes regex. */
static inline int
is_word_byte(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
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

/* What a byte may be to session_state_in (GNU range initializers, as gcc and clang take them). */
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

/* The session-state words of sql_words.mentions_session_state_python in a whole Query or Parse message
   `s` of `n` bytes (its 5-byte header is skipped). Every Query and Parse the relay passes is read here, so
   most bytes cost one table look-up: only an "a", or a word's start with one of the letters, is looked at. */
static inline int
session_state_in(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t start = 5;
    for (Py_ssize_t i = start; i < n; i++) {
        unsigned char what = word_classes[s[i]];
        if (!(what & (WORD_FIRST | WORD_A)))
            continue;
        if (what & WORD_A) {
            if (prefix_at(s, i, n, "advisory", 8))
                return 1;
            continue;
        }
        if (i > start && (word_classes[s[i - 1]] & WORD_BYTE))
            continue;
        int found = 0;
        switch (s[i] | 0x20) {
        case 'r':
            found = word_at(s, i, n, "reset", 5);
            break;
        case 'd':
            found = word_at(s, i, n, "discard", 7) || word_at(s, i, n, "deallocate", 10)
                    || word_at(s, i, n, "declare", 7);
            break;
        case 'l':
            found = word_at(s, i, n, "listen", 6) || word_at(s, i, n, "load", 4);
            break;
        case 'u':
            found = word_at(s, i, n, "unlisten", 8);
            break;
        case 'p':
            found = word_at(s, i, n, "prepare", 7) || prefix_at(s, i, n, "pg_temp", 7);
            break;
        case 'c':
            found = word_at(s, i, n, "close", 5);
            break;
        case 't':
            found = word_at(s, i, n, "temp", 4) || word_at(s, i, n, "temporary", 9);
            break;
        case 's':
            found = prefix_at(s, i, n, "set_config", 10)
                    || (word_at(s, i, n, "set", 3) && set_may_begin_statement(s, i, start));
            break;
        }
        if (found)
            return 1;
    }
    return 0;
}

#endif
