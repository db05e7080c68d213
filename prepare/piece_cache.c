/* The piece splitter, BPE and piece cache behind Tokenizer.encode_packed, in C.
 *
 * It does what tinyllama/pieces.py's regex, dict and the Rust `tokenizers` BPE model do, on
 * UTF-8 bytes and without a Python object per piece or token: normalized text ("▁" for each
 * space and in front) is cut into pieces by the same five alternatives, tried in the same
 * order, with the same backtracking (piece_end); each piece is looked up in a hash table, and
 * one not seen before goes through BPE (bpe: the `tokenizers` crate's merge loop, merge for
 * merge: lowest rank first, then leftmost, stale entries checked the same way, byte fallback
 * for characters not in the vocabulary) and is added. tinyllama/pieces.py loads this through
 * ctypes and hands it the vocabulary's single characters, byte tokens and ranked merges; tests
 * hold it to the Rust model piece for piece and to Tokenizer.encode id for id.
 *
 * Character classes (bits): L an ASCII letter, S a "safe" ASCII punctuation mark, A an ASCII
 * character in no multi-character piece ("alone"), W the "▁" (U+2581, E2 96 81). Every other
 * character, any non-ASCII one included, is "other" (0). The caller passes L/S/A per ASCII
 * code, read off the vocabulary exactly as the regex is built.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CL_L 1
#define CL_S 2
#define CL_A 4
#define CL_W 8

/* A table from 64-bit keys (never 0) to two int32 values, open addressing. */
typedef struct { uint64_t *key; int32_t *a, *b; int64_t mask; } Table;

typedef struct { int32_t rank, pos, id; } Merge;              /* a heap entry: (rank, pos) ascending */
typedef struct { int32_t id, prev, next, len; } Symbol;       /* len 0: merged into its left neighbour */

typedef struct {
    uint8_t ascii[128];   /* CL_L | CL_S | CL_A per ASCII code */
    int runs;             /* 1: the letter-run and mark-run alternatives are part of the rule */
    /* the BPE model */
    Table chars;          /* a character's UTF-8 bytes (| length << 32) -> its id */
    Table merges;         /* (left id << 32 | right id) + 1 -> rank, merged id */
    int32_t byte_ids[256];
    Symbol *sym; int64_t sym_cap;
    Merge *heap; int64_t heap_cap;
    /* the piece cache: pieces table (key: hash) -> entry; keys and ids in arenas */
    uint8_t *keys; int64_t keys_len, keys_cap;
    uint16_t *ids; int64_t ids_len, ids_cap;
    int64_t *key_off, *ids_off; int32_t *key_len, *ids_n;
    int64_t n, cap;
    uint32_t *slot; uint64_t *slot_hash; int64_t mask;   /* entry + 1 per slot (0: empty) */
} PieceCache;

static int grow(void **p, int64_t *cap, int64_t need, size_t size) {
    if (need <= *cap) return 0;
    int64_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * size);
    if (!q) return -1;
    *p = q; *cap = c;
    return 0;
}

/* ---- tables ------------------------------------------------------------------------------ */

static uint64_t mix(uint64_t k) {       /* splitmix64's finalizer */
    k ^= k >> 30; k *= 0xbf58476d1ce4e5b9ULL; k ^= k >> 27; k *= 0x94d049bb133111ebULL;
    return k ^ (k >> 31);
}

static int table_init(Table *t, int64_t n) {
    int64_t size = 1024;
    while (size < 2 * n) size *= 2;
    t->key = calloc((size_t)size, sizeof *t->key);
    t->a = malloc((size_t)size * sizeof *t->a);
    t->b = malloc((size_t)size * sizeof *t->b);
    t->mask = size - 1;
    return t->key && t->a && t->b ? 0 : -1;
}

static void table_free(Table *t) { free(t->key); free(t->a); free(t->b); }

/* Inserts key unless it is there (the first insert wins, as the first merge of a pair does). */
static void table_put(Table *t, uint64_t key, int32_t a, int32_t b) {
    int64_t i = (int64_t)(mix(key) & (uint64_t)t->mask);
    while (t->key[i] && t->key[i] != key) i = (i + 1) & t->mask;
    if (t->key[i]) return;
    t->key[i] = key; t->a[i] = a; t->b[i] = b;
}

static int64_t table_get(const Table *t, uint64_t key) {
    int64_t i = (int64_t)(mix(key) & (uint64_t)t->mask);
    for (; t->key[i]; i = (i + 1) & t->mask)
        if (t->key[i] == key) return i;
    return -1;
}

static uint64_t char_key(const uint8_t *s, int len) {
    uint64_t k = (uint64_t)len << 32;
    for (int i = 0; i < len; i++) k |= (uint64_t)s[i] << (8 * i);
    return k;
}

static uint64_t pair_key(int32_t left, int32_t right) {
    return ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
}

/* ---- the split rule ------------------------------------------------------------------------ */

/* The class of the character at s[i] and its length in bytes. */
static inline int char_at(const PieceCache *c, const uint8_t *s, int64_t i, int64_t n, int *len) {
    uint8_t b = s[i];
    if (b < 0x80) { *len = 1; return c->ascii[b]; }
    if (b == 0xE2 && i + 2 < n && s[i + 1] == 0x96 && s[i + 2] == 0x81) { *len = 3; return CL_W; }
    int l = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1;
    *len = i + l > n ? (int)(n - i) : l;
    return 0;
}

/* `[IN]+(?![^NEXT])` from q, with the regex's backtracking: the longest run of IN characters
 * (all ASCII, one byte each) whose end is the text's end or a character in NEXT. Returns the
 * end, or q when there is none. */
static int64_t run_end(const PieceCache *c, const uint8_t *s, int64_t q, int64_t n, int in, int next) {
    int64_t r = q;
    int len;
    while (r < n && s[r] < 0x80 && (c->ascii[s[r]] & in)) r++;
    for (int64_t e = r; e > q; e--)
        if (e == n || (char_at(c, s, e, n, &len) & next)) return e;
    return q;
}

/* The end of the piece that starts at p: the regex
 *   ▁*[L]+(?![^▁AS]) | ▁*[S]+(?![^▁AL]) | [A] | ▁*[^▁A]+ | ▁+
 * (the first two only when c->runs), first alternative that matches. Backtracking into ▁*
 * never helps: every alternative after it starts with a class that excludes ▁. Some
 * alternative always matches (a ▁ by the last, an A by the third, anything else by the
 * fourth), so no character is skipped. */
static int64_t piece_end(const PieceCache *c, const uint8_t *s, int64_t p, int64_t n) {
    int len;
    int64_t q = p, e;
    while (q < n && char_at(c, s, q, n, &len) == CL_W) q += 3;
    if (c->runs && q < n) {
        if ((e = run_end(c, s, q, n, CL_L, CL_W | CL_A | CL_S)) > q) return e;
        if ((e = run_end(c, s, q, n, CL_S, CL_W | CL_A | CL_L)) > q) return e;
    }
    if (q == p && (char_at(c, s, p, n, &len) & CL_A)) return p + 1;
    e = q;
    while (e < n && !(char_at(c, s, e, n, &len) & (CL_W | CL_A))) e += len;
    return e;   /* > q for the fourth alternative; == q (> p) for ▁+ */
}

/* ---- BPE ----------------------------------------------------------------------------------- */

static int merge_less(const Merge *x, const Merge *y) {
    return x->rank != y->rank ? x->rank < y->rank : x->pos < y->pos;
}

static int heap_push(PieceCache *c, int64_t *n, Merge m) {
    if (grow((void **)&c->heap, &c->heap_cap, *n + 1, sizeof m)) return -1;
    int64_t i = (*n)++;
    while (i > 0 && merge_less(&m, &c->heap[(i - 1) / 2])) { c->heap[i] = c->heap[(i - 1) / 2]; i = (i - 1) / 2; }
    c->heap[i] = m;
    return 0;
}

static Merge heap_pop(PieceCache *c, int64_t *n) {
    Merge top = c->heap[0], last = c->heap[--*n];
    int64_t i = 0;
    for (;;) {
        int64_t k = 2 * i + 1;
        if (k >= *n) break;
        if (k + 1 < *n && merge_less(&c->heap[k + 1], &c->heap[k])) k++;
        if (!merge_less(&c->heap[k], &last)) break;
        c->heap[i] = c->heap[k]; i = k;
    }
    if (*n) c->heap[i] = last;
    return top;
}

/* Queues the merge of symbol `pos` with its right neighbour, if the model has one. */
static int queue_pair(PieceCache *c, int64_t *nheap, int32_t pos) {
    int32_t next = c->sym[pos].next;
    if (next < 0) return 0;
    int64_t i = table_get(&c->merges, pair_key(c->sym[pos].id, c->sym[next].id));
    if (i < 0) return 0;
    Merge m = {c->merges.a[i], pos, c->merges.b[i]};
    return heap_push(c, nheap, m);
}

/* The piece's symbols: each character's id, or its bytes' ids where the vocabulary lacks it.
 * Returns how many, -3 out of memory, -4 a byte the vocabulary has no token for. */
static int64_t symbols(PieceCache *c, const uint8_t *s, int64_t n) {
    int64_t k = 0;
    if (grow((void **)&c->sym, &c->sym_cap, n, sizeof(Symbol))) return -3;
    for (int64_t i = 0; i < n;) {
        int len;
        char_at(c, s, i, n, &len);
        int64_t t = table_get(&c->chars, char_key(s + i, len));
        if (t >= 0) {
            c->sym[k] = (Symbol){c->chars.a[t], (int32_t)k - 1, (int32_t)k + 1, len}; k++;
        } else {
            for (int j = 0; j < len; j++) {
                if (c->byte_ids[s[i + j]] < 0) return -4;
                c->sym[k] = (Symbol){c->byte_ids[s[i + j]], (int32_t)k - 1, (int32_t)k + 1, 1}; k++;
            }
        }
        i += len;
    }
    if (k) c->sym[k - 1].next = -1;
    return k;
}

/* BPE of one piece s[0:n) into out (at most n ids); returns how many, or symbols' errors. */
static int64_t bpe(PieceCache *c, const uint8_t *s, int64_t n, uint16_t *out) {
    int64_t k = symbols(c, s, n), nheap = 0;
    if (k < 0) return k;
    for (int32_t i = 0; i + 1 < k; i++)
        if (queue_pair(c, &nheap, i)) return -3;
    while (nheap) {
        Merge top = heap_pop(c, &nheap);
        Symbol *left = &c->sym[top.pos];
        if (left->len == 0 || left->next < 0) continue;          /* merged away, or last */
        Symbol *right = &c->sym[left->next];
        int64_t i = table_get(&c->merges, pair_key(left->id, right->id));
        if (i < 0 || c->merges.b[i] != top.id) continue;        /* an expired entry */
        left->id = top.id;
        left->len += right->len;
        right->len = 0;
        left->next = right->next;
        if (right->next >= 0) c->sym[right->next].prev = top.pos;
        if ((left->prev >= 0 && queue_pair(c, &nheap, left->prev)) || queue_pair(c, &nheap, top.pos)) return -3;
    }
    int64_t w = 0;
    for (int32_t i = k ? 0 : -1; i >= 0; i = c->sym[i].next) out[w++] = (uint16_t)c->sym[i].id;
    return w;
}

/* ---- the piece cache ----------------------------------------------------------------------- */

static uint64_t fnv1a(const uint8_t *s, int64_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (int64_t i = 0; i < n; i++) { h ^= s[i]; h *= 1099511628211ULL; }
    return h;
}

static int rehash(PieceCache *c, int64_t slots) {
    uint32_t *slot = calloc((size_t)slots, sizeof *slot);
    uint64_t *hash = malloc((size_t)slots * sizeof *hash);
    if (!slot || !hash) { free(slot); free(hash); return -1; }
    for (int64_t i = 0; i <= c->mask; i++) {
        if (!c->slot[i]) continue;
        int64_t j = (int64_t)(c->slot_hash[i] & (uint64_t)(slots - 1));
        while (slot[j]) j = (j + 1) & (slots - 1);
        slot[j] = c->slot[i];
        hash[j] = c->slot_hash[i];
    }
    free(c->slot); free(c->slot_hash);
    c->slot = slot; c->slot_hash = hash; c->mask = slots - 1;
    return 0;
}

/* The entry of key s[0:len) (hash h), or -1; *free_slot is where it would go. */
static int64_t find(const PieceCache *c, const uint8_t *s, int32_t len, uint64_t h, int64_t *free_slot) {
    int64_t i = (int64_t)(h & (uint64_t)c->mask);
    for (;; i = (i + 1) & c->mask) {
        uint32_t e = c->slot[i];
        if (!e) { *free_slot = i; return -1; }
        if (c->slot_hash[i] == h && c->key_len[e - 1] == len && !memcmp(c->keys + c->key_off[e - 1], s, (size_t)len))
            return e - 1;
    }
}

static int grow_entries(PieceCache *c) {
    if (c->n < c->cap) return 0;
    int64_t cap = c->cap ? 2 * c->cap : 4096;
    void *a = realloc(c->key_off, (size_t)cap * sizeof(int64_t)); if (!a) return -1; c->key_off = a;
    a = realloc(c->ids_off, (size_t)cap * sizeof(int64_t)); if (!a) return -1; c->ids_off = a;
    a = realloc(c->key_len, (size_t)cap * sizeof(int32_t)); if (!a) return -1; c->key_len = a;
    a = realloc(c->ids_n, (size_t)cap * sizeof(int32_t)); if (!a) return -1; c->ids_n = a;
    c->cap = cap;
    return 0;
}

/* Runs piece s[0:len) through BPE and adds it at free slot `at`; returns the entry, or < 0. */
static int64_t add(PieceCache *c, const uint8_t *s, int32_t len, uint64_t h, int64_t at) {
    if (grow((void **)&c->keys, &c->keys_cap, c->keys_len + len, 1) || grow_entries(c)
        || grow((void **)&c->ids, &c->ids_cap, c->ids_len + len, sizeof(uint16_t))) return -3;
    int64_t k = bpe(c, s, len, c->ids + c->ids_len);
    if (k < 0) return k;
    memcpy(c->keys + c->keys_len, s, (size_t)len);
    c->key_off[c->n] = c->keys_len; c->key_len[c->n] = len;
    c->ids_off[c->n] = c->ids_len; c->ids_n[c->n] = (int32_t)k;
    c->keys_len += len; c->ids_len += k;
    c->slot[at] = (uint32_t)(c->n + 1);
    c->slot_hash[at] = h;
    c->n++;
    if (2 * c->n > c->mask + 1 && rehash(c, 2 * (c->mask + 1))) return -3;
    return c->n - 1;
}

/* ---- the interface (tinyllama/pieces.py) ------------------------------------------------ */

/* ascii_classes: 128 class bytes. The model: nchars single characters (4 UTF-8 bytes each,
 * zero-padded, their lengths and ids), the 256 byte-fallback ids (-1: none), and nmerges merges
 * in rank order (left id, right id, merged id). */
PieceCache *pc_new(const uint8_t *ascii_classes, int runs, int64_t nchars, const uint8_t *char_bytes,
                   const uint8_t *char_lens, const int32_t *char_ids, const int32_t *byte_ids,
                   int64_t nmerges, const int32_t *left, const int32_t *right, const int32_t *merged) {
    PieceCache *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    memcpy(c->ascii, ascii_classes, 128);
    c->runs = runs;
    memcpy(c->byte_ids, byte_ids, sizeof c->byte_ids);
    c->mask = (1 << 16) - 1;
    c->slot = calloc((size_t)c->mask + 1, sizeof *c->slot);
    c->slot_hash = malloc(((size_t)c->mask + 1) * sizeof *c->slot_hash);
    if (!c->slot || !c->slot_hash || table_init(&c->chars, nchars) || table_init(&c->merges, nmerges)) {
        free(c->slot); free(c->slot_hash); table_free(&c->chars); table_free(&c->merges); free(c);
        return NULL;
    }
    for (int64_t i = 0; i < nchars; i++) table_put(&c->chars, char_key(char_bytes + 4 * i, char_lens[i]), char_ids[i], 0);
    for (int64_t i = 0; i < nmerges; i++) table_put(&c->merges, pair_key(left[i], right[i]), (int32_t)i, merged[i]);
    return c;
}

void pc_free(PieceCache *c) {
    if (!c) return;
    free(c->keys); free(c->ids); free(c->key_off); free(c->ids_off); free(c->key_len); free(c->ids_n);
    free(c->slot); free(c->slot_hash); free(c->sym); free(c->heap);
    table_free(&c->chars); table_free(&c->merges);
    free(c);
}

/* Forgets every cached piece (bounded memory: the caller clears a full cache and starts again). */
void pc_clear(PieceCache *c) {
    memset(c->slot, 0, ((size_t)c->mask + 1) * sizeof *c->slot);
    c->n = c->keys_len = c->ids_len = 0;
}

int64_t pc_size(const PieceCache *c) { return c->n; }

/* Cuts text s[0:n) into pieces: writes each piece's end to ends[] and returns how many. */
int64_t pc_split(const PieceCache *c, const uint8_t *s, int64_t n, int64_t *ends) {
    int64_t k = 0;
    for (int64_t p = 0; p < n; p = ends[k++]) ends[k] = piece_end(c, s, p, n);
    return k;
}

/* BPE of one piece, uncached, into out (room for n ids); returns how many or < 0. */
int64_t pc_bpe(PieceCache *c, const uint8_t *s, int64_t n, uint16_t *out) { return bpe(c, s, n, out); }

/* Encodes texts buf[offs[t]:offs[t+1]) for t < ntexts: head ids, each piece's ids, tail ids,
 * into out (capacity cap), each text's count in lengths[t]. Returns the number of ids
 * written; -2 when out is too small, -3 when memory ran out, -4 when a piece has a byte the
 * vocabulary has no token for. */
int64_t pc_encode(PieceCache *c, const uint8_t *buf, const int64_t *offs, int64_t ntexts,
                  const uint16_t *head, int32_t nhead, const uint16_t *tail, int32_t ntail,
                  uint16_t *out, int64_t cap, uint32_t *lengths) {
    int64_t w = 0, slot;
    for (int64_t t = 0; t < ntexts; t++) {
        int64_t start = w, p = offs[t], end = offs[t + 1];
        if (w + nhead > cap) return -2;
        memcpy(out + w, head, (size_t)nhead * 2); w += nhead;
        while (p < end) {
            int64_t e = piece_end(c, buf, p, end);
            int32_t len = (int32_t)(e - p);
            uint64_t h = fnv1a(buf + p, len);
            int64_t i = find(c, buf + p, len, h, &slot);
            if (i < 0 && (i = add(c, buf + p, len, h, slot)) < 0) return i;
            if (w + c->ids_n[i] > cap) return -2;
            memcpy(out + w, c->ids + c->ids_off[i], (size_t)c->ids_n[i] * 2);
            w += c->ids_n[i];
            p = e;
        }
        if (w + ntail > cap) return -2;
        memcpy(out + w, tail, (size_t)ntail * 2); w += ntail;
        lengths[t] = (uint32_t)(w - start);
    }
    return w;
}
