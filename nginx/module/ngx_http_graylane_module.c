/*
 * graylane's native nginx module: the thin adapter between nginx and libgraylane_nginx.so,
 * which decides with graylane-strategy's own decide() and follows the control plane's feed in
 * a thread of its own per worker. Nothing is decided here. It does what nginx/lua/graylane.lua
 * does through LuaJIT, without entering Lua on every request (set_by_lua and balancer_by_lua
 * were most of what graylane added to a request in nginx):
 *
 *   graylane_library /path/libgraylane_nginx.so;   http: loads the library (dlopen)
 *   graylane_service web '<json>';                  http: checks a service's configuration
 *                                                  (nginx -t fails on a bad one); each worker
 *                                                  opens it (its feed thread) when it starts
 *   graylane web;                                   location: $graylane_route, $graylane_lane
 *                                                  and $graylane_reason decide for web
 *   graylane_balancer web;                          upstream: the peer is the chosen cluster's
 *                                                  next endpoint (retries: the ones after it)
 *   graylane_status;                                location: each service's state, JSON
 *
 * The decision is made once per request, on first use of a variable (or by the balancer),
 * and kept in the request's module context. Failure: a library that cannot decide sends the
 * request to the stable cluster (the library's choice, never gray); no cluster at all leaves
 * $graylane_route empty, and the rendered location answers 503.
 *
 * Written in C because a module is compiled against nginx's own headers; the logic stays in
 * Rust (nginx/src/ffi.rs: graylane_route_request, graylane_peer_at).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <dlfcn.h>

/* The library's C ABI (nginx/src/ffi.rs). */
typedef struct graylane_handle graylane_handle;

typedef struct {
    int           len;
    const u_char *data;
} gl_str_t;

typedef struct {
    gl_str_t  key;   /* lowercase name */
    gl_str_t  value;
} gl_header_t;

#define GL_PEER_NAME  53

typedef struct {
    uint16_t  family;   /* 4, 6; 0: no endpoint */
    uint16_t  port;
    uint8_t   addr[16];
    uint32_t  index;
    uint32_t  count;
    uint32_t  name_len;             /* "IP:PORT", "[IPv6]:PORT" */
    u_char    name[GL_PEER_NAME];
} gl_peer_t;

typedef struct {
    int32_t    status;  /* 0: routed; -1: no cluster can serve */
    uint32_t   route_len;
    uint32_t   lane_len;
    uint32_t   key_len;
    uint32_t   reason_len;
    uint32_t   lane_header_len;
    gl_peer_t  peer;
} gl_routed_t;

typedef struct {
    int (*check)(const char *cfg, size_t len, char *err, size_t cap);
    graylane_handle *(*open)(const char *cfg, size_t len, char *err, size_t cap);
    void (*close)(graylane_handle *h);
    size_t (*route)(const graylane_handle *h, const gl_header_t *headers, size_t n,
                    const u_char *path, size_t path_len, u_char *buf, size_t cap,
                    gl_routed_t *out);
    int (*peer_at)(const graylane_handle *h, const u_char *key, size_t len, uint32_t index,
                   gl_peer_t *out);
    size_t (*status)(const graylane_handle *h, u_char *buf, size_t cap);
} gl_lib_t;

#define GL_ERR_CAP        4096
#define GL_TEXT_CAP       512    /* a decision's texts fit this nearly always */
#define GL_STACK_HEADERS  64
#define GL_MORE_TRIES     2      /* more endpoints after a failed connection */

typedef struct {
    ngx_str_t         name;
    ngx_str_t         config;  /* JSON, NUL-terminated */
    graylane_handle  *h;       /* this worker's, from init_process */
} gl_service_t;

typedef struct {
    ngx_uint_t    loaded;
    gl_lib_t      lib;
    ngx_array_t   services;   /* gl_service_t */
} gl_main_conf_t;

typedef struct {
    ngx_int_t  service;  /* index in services, NGX_CONF_UNSET: none */
} gl_loc_conf_t;

typedef struct {
    ngx_int_t  service;
} gl_srv_conf_t;

/* One request's decision. */
typedef struct {
    ngx_str_t     route;
    ngx_str_t     lane;
    ngx_str_t     reason;
    ngx_str_t     key;
    gl_peer_t     peer;
    ngx_int_t     service;
} gl_ctx_t;

/* The balancer's state for one request. */
typedef struct {
    gl_ctx_t             *ctx;
    gl_service_t         *svc;
    ngx_uint_t            attempt;
    union {
        struct sockaddr       sa;
        struct sockaddr_in    sin;
#if (NGX_HAVE_INET6)
        struct sockaddr_in6   sin6;
#endif
    } sockaddr;
    ngx_str_t             name;
    u_char                name_buf[GL_PEER_NAME];
} gl_peer_data_t;

static void *gl_create_main_conf(ngx_conf_t *cf);
static void *gl_create_srv_conf(ngx_conf_t *cf);
static void *gl_create_loc_conf(ngx_conf_t *cf);
static char *gl_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static ngx_int_t gl_add_variables(ngx_conf_t *cf);
static char *gl_library(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *gl_service(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *gl_route(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *gl_balancer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *gl_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t gl_init_process(ngx_cycle_t *cycle);
static void gl_exit_process(ngx_cycle_t *cycle);

static ngx_command_t gl_commands[] = {
    { ngx_string("graylane_library"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      gl_library, NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL },
    { ngx_string("graylane_service"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE2,
      gl_service, NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL },
    { ngx_string("graylane"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      gl_route, NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },
    { ngx_string("graylane_balancer"),
      NGX_HTTP_UPS_CONF|NGX_CONF_TAKE1,
      gl_balancer, NGX_HTTP_SRV_CONF_OFFSET, 0, NULL },
    { ngx_string("graylane_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      gl_status, NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },
    ngx_null_command
};

static ngx_http_module_t gl_module_ctx = {
    gl_add_variables,      /* preconfiguration */
    NULL,                  /* postconfiguration */
    gl_create_main_conf,   /* create main configuration */
    NULL,                  /* init main configuration */
    gl_create_srv_conf,    /* create server configuration */
    NULL,                  /* merge server configuration */
    gl_create_loc_conf,    /* create location configuration */
    gl_merge_loc_conf      /* merge location configuration */
};

ngx_module_t ngx_http_graylane_module = {
    NGX_MODULE_V1,
    &gl_module_ctx,
    gl_commands,
    NGX_HTTP_MODULE,
    NULL,                  /* init master */
    NULL,                  /* init module */
    gl_init_process,       /* init process */
    NULL,                  /* init thread */
    NULL,                  /* exit thread */
    gl_exit_process,       /* exit process */
    NULL,                  /* exit master */
    NGX_MODULE_V1_PADDING
};

/* The cycle's main configuration, from a worker (init_process, the request path). */
static gl_main_conf_t *gl_main_conf_of(ngx_cycle_t *cycle)
{
    ngx_http_conf_ctx_t  *ctx = (ngx_http_conf_ctx_t *) cycle->conf_ctx[ngx_http_module.index];

    if (ctx == NULL) {
        return NULL;
    }
    return ctx->main_conf[ngx_http_graylane_module.ctx_index];
}

static void *gl_create_main_conf(ngx_conf_t *cf)
{
    gl_main_conf_t  *mcf = ngx_pcalloc(cf->pool, sizeof(gl_main_conf_t));

    if (mcf == NULL) {
        return NULL;
    }
    if (ngx_array_init(&mcf->services, cf->pool, 4, sizeof(gl_service_t)) != NGX_OK) {
        return NULL;
    }
    return mcf;
}

static void *gl_create_srv_conf(ngx_conf_t *cf)
{
    gl_srv_conf_t  *scf = ngx_pcalloc(cf->pool, sizeof(gl_srv_conf_t));

    if (scf == NULL) {
        return NULL;
    }
    scf->service = NGX_CONF_UNSET;
    return scf;
}

static void *gl_create_loc_conf(ngx_conf_t *cf)
{
    gl_loc_conf_t  *lcf = ngx_pcalloc(cf->pool, sizeof(gl_loc_conf_t));

    if (lcf == NULL) {
        return NULL;
    }
    lcf->service = NGX_CONF_UNSET;
    return lcf;
}

static char *gl_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    gl_loc_conf_t  *prev = parent;
    gl_loc_conf_t  *conf = child;

    ngx_conf_merge_value(conf->service, prev->service, NGX_CONF_UNSET);
    return NGX_CONF_OK;
}

static char *gl_library(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    gl_main_conf_t  *mcf = conf;
    ngx_str_t       *value = cf->args->elts;
    void            *dl;
    char            *path;

    if (mcf->loaded) {
        return "is duplicate";
    }
    path = (char *) ngx_pnalloc(cf->pool, value[1].len + 1);
    if (path == NULL) {
        return NGX_CONF_ERROR;
    }
    ngx_cpystrn((u_char *) path, value[1].data, value[1].len + 1);

    /* Never closed: a worker's feed threads run the library's code until the worker ends. */
    dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (dl == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "graylane_library: %s", dlerror());
        return NGX_CONF_ERROR;
    }

#define GL_SYM(field, name)                                                               \
    *(void **) (&mcf->lib.field) = dlsym(dl, name);                                       \
    if (mcf->lib.field == NULL) {                                                         \
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,                                           \
                           "graylane_library: %s has no %s (a library of another version?)", \
                           path, name);                                                   \
        return NGX_CONF_ERROR;                                                            \
    }

    GL_SYM(check, "graylane_check");
    GL_SYM(open, "graylane_open");
    GL_SYM(close, "graylane_close");
    GL_SYM(route, "graylane_route_request");
    GL_SYM(peer_at, "graylane_peer_at");
    GL_SYM(status, "graylane_status");
#undef GL_SYM

    mcf->loaded = 1;
    return NGX_CONF_OK;
}

/* The index of service `name` in the main configuration, or NGX_ERROR. */
static ngx_int_t gl_find(gl_main_conf_t *mcf, ngx_str_t *name)
{
    gl_service_t  *s = mcf->services.elts;
    ngx_uint_t     i;

    for (i = 0; i < mcf->services.nelts; i++) {
        if (s[i].name.len == name->len && ngx_strncmp(s[i].name.data, name->data, name->len) == 0) {
            return (ngx_int_t) i;
        }
    }
    return NGX_ERROR;
}

static char *gl_service(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    gl_main_conf_t  *mcf = conf;
    ngx_str_t       *value = cf->args->elts;
    gl_service_t    *s;
    u_char          *json;
    char             err[GL_ERR_CAP];

    if (!mcf->loaded) {
        return "needs graylane_library before it";
    }
    if (gl_find(mcf, &value[1]) != NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "graylane_service: \"%V\" is declared twice",
                           &value[1]);
        return NGX_CONF_ERROR;
    }
    json = ngx_pnalloc(cf->pool, value[2].len + 1);
    if (json == NULL) {
        return NGX_CONF_ERROR;
    }
    ngx_cpystrn(json, value[2].data, value[2].len + 1);

    err[0] = '\0';
    if (mcf->lib.check((const char *) json, value[2].len, err, GL_ERR_CAP - 1) != 0) {
        err[GL_ERR_CAP - 1] = '\0';
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "graylane: service %V: invalid configuration: %s", &value[1], err);
        return NGX_CONF_ERROR;
    }

    s = ngx_array_push(&mcf->services);
    if (s == NULL) {
        return NGX_CONF_ERROR;
    }
    s->name = value[1];
    s->config.data = json;
    s->config.len = value[2].len;
    s->h = NULL;
    return NGX_CONF_OK;
}

/* The service named by a directive's argument, declared before it. */
static ngx_int_t gl_service_arg(ngx_conf_t *cf)
{
    gl_main_conf_t  *mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_graylane_module);
    ngx_str_t       *value = cf->args->elts;
    ngx_int_t        i = gl_find(mcf, &value[1]);

    if (i == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "graylane: no graylane_service \"%V\" declared before this",
                           &value[1]);
    }
    return i;
}

static char *gl_route(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    gl_loc_conf_t  *lcf = conf;

    if (lcf->service != NGX_CONF_UNSET) {
        return "is duplicate";
    }
    lcf->service = gl_service_arg(cf);
    return lcf->service == NGX_ERROR ? NGX_CONF_ERROR : NGX_CONF_OK;
}

static ngx_int_t gl_init_process(ngx_cycle_t *cycle)
{
    gl_main_conf_t  *mcf = gl_main_conf_of(cycle);
    gl_service_t    *s;
    ngx_uint_t       i;
    char             err[GL_ERR_CAP];

    if (mcf == NULL || !mcf->loaded) {
        return NGX_OK;
    }
    s = mcf->services.elts;
    for (i = 0; i < mcf->services.nelts; i++) {
        err[0] = '\0';
        s[i].h = mcf->lib.open((const char *) s[i].config.data, s[i].config.len, err,
                               GL_ERR_CAP - 1);
        if (s[i].h == NULL) {
            err[GL_ERR_CAP - 1] = '\0';
            ngx_log_error(NGX_LOG_ERR, cycle->log, 0, "graylane: service %V: %s",
                          &s[i].name, err);
        }
    }
    return NGX_OK;
}

static void gl_exit_process(ngx_cycle_t *cycle)
{
    gl_main_conf_t  *mcf = gl_main_conf_of(cycle);
    gl_service_t    *s;
    ngx_uint_t       i;

    if (mcf == NULL || !mcf->loaded) {
        return;
    }
    s = mcf->services.elts;
    for (i = 0; i < mcf->services.nelts; i++) {
        if (s[i].h != NULL) {
            mcf->lib.close(s[i].h);
            s[i].h = NULL;
        }
    }
}

/* Sets every header of the request named `name` to `value`, or adds one (a strategy's own
 * lane header: client copies never reach the upstream). */
static ngx_int_t gl_set_header(ngx_http_request_t *r, u_char *name, size_t name_len,
                               u_char *value, size_t value_len)
{
    ngx_list_part_t  *part = &r->headers_in.headers.part;
    ngx_table_elt_t  *h = part->elts;
    ngx_uint_t        i, found = 0;

    for (i = 0; /* void */; i++) {
        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }
            part = part->next;
            h = part->elts;
            i = 0;
        }
        if (h[i].key.len == name_len && ngx_strncasecmp(h[i].key.data, name, name_len) == 0) {
            h[i].value.data = value;
            h[i].value.len = value_len;
            found = 1;
        }
    }
    if (found) {
        return NGX_OK;
    }
    h = ngx_list_push(&r->headers_in.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }
    ngx_memzero(h, sizeof(ngx_table_elt_t));
    h->hash = 1;
    h->key.data = name;
    h->key.len = name_len;
    h->lowcase_key = name;  /* the library's names are lowercase */
    h->value.data = value;
    h->value.len = value_len;
    return NGX_OK;
}

/* Decides for request `r` and service `service` (once: kept in the request's context). */
static gl_ctx_t *gl_decide(ngx_http_request_t *r, ngx_int_t service)
{
    gl_main_conf_t   *mcf;
    gl_service_t     *svc;
    gl_ctx_t         *ctx;
    gl_header_t       stack[GL_STACK_HEADERS], *hs = stack;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;
    ngx_uint_t        i, n = 0, cap = GL_STACK_HEADERS;
    gl_routed_t       out;
    u_char           *buf, *p;
    size_t            len;

    ctx = ngx_http_get_module_ctx(r, ngx_http_graylane_module);
    if (ctx != NULL) {
        return ctx;
    }
    ctx = ngx_pcalloc(r->pool, sizeof(gl_ctx_t));
    if (ctx == NULL) {
        return NULL;
    }
    ctx->service = service;
    ngx_http_set_ctx(r, ctx, ngx_http_graylane_module);

    mcf = ngx_http_get_module_main_conf(r, ngx_http_graylane_module);
    svc = (gl_service_t *) mcf->services.elts + service;
    if (svc->h == NULL) {
        return ctx;  /* the service did not open in this worker (logged): 503 */
    }

    /* The request's headers as nginx holds them, lowercase names, every one. */
    part = &r->headers_in.headers.part;
    h = part->elts;
    for (i = 0; /* void */; i++) {
        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }
            part = part->next;
            h = part->elts;
            i = 0;
        }
        if (n == cap) {
            gl_header_t  *more = ngx_palloc(r->pool, 2 * cap * sizeof(gl_header_t));

            if (more == NULL) {
                return ctx;
            }
            ngx_memcpy(more, hs, n * sizeof(gl_header_t));
            hs = more;
            cap *= 2;
        }
        hs[n].key.len = (int) h[i].key.len;
        hs[n].key.data = h[i].lowcase_key;
        hs[n].value.len = (int) h[i].value.len;
        hs[n].value.data = h[i].value.data;
        n++;
    }

    buf = ngx_pnalloc(r->pool, GL_TEXT_CAP);
    if (buf == NULL) {
        return ctx;
    }
    len = mcf->lib.route(svc->h, hs, n, r->unparsed_uri.data, r->unparsed_uri.len, buf,
                         GL_TEXT_CAP, &out);
    if (len > GL_TEXT_CAP) {
        buf = ngx_pnalloc(r->pool, len);
        if (buf == NULL) {
            return ctx;
        }
        len = mcf->lib.route(svc->h, hs, n, r->unparsed_uri.data, r->unparsed_uri.len, buf,
                             len, &out);
    }
    if (len == 0) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "graylane: service %V: the library failed to decide", &svc->name);
        return ctx;
    }
    if (out.status != 0) {
        return ctx;  /* no cluster can serve: $graylane_route stays empty (503) */
    }

    p = buf;
    ctx->route.data = p;
    ctx->route.len = out.route_len;
    p += out.route_len;
    ctx->lane.data = p;
    ctx->lane.len = out.lane_len;
    p += out.lane_len;
    ctx->key.data = p;
    ctx->key.len = out.key_len;
    p += out.key_len;
    ctx->reason.data = p;
    ctx->reason.len = out.reason_len;
    p += out.reason_len;
    ctx->peer = out.peer;
    if (out.lane_header_len > 0) {
        /* The strategy's own lane header goes on the request; $graylane_lane (sent as
         * x-graylane-lane) stays empty, so nothing is sent under that name. */
        if (gl_set_header(r, p, out.lane_header_len, ctx->lane.data, ctx->lane.len) != NGX_OK) {
            return ctx;
        }
        ctx->lane.len = 0;
    }
    return ctx;
}

/* $graylane_route, $graylane_lane, $graylane_reason: `data` is the field's offset. */
static ngx_int_t gl_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data)
{
    gl_loc_conf_t  *lcf = ngx_http_get_module_loc_conf(r, ngx_http_graylane_module);
    gl_ctx_t       *ctx = ngx_http_get_module_ctx(r, ngx_http_graylane_module);
    ngx_str_t      *s;

    if (ctx == NULL) {
        if (lcf->service == NGX_CONF_UNSET) {
            v->not_found = 1;
            return NGX_OK;
        }
        ctx = gl_decide(r, lcf->service);
        if (ctx == NULL) {
            return NGX_ERROR;
        }
    }
    s = (ngx_str_t *) ((u_char *) ctx + data);
    v->len = s->len;
    v->data = s->data;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    return NGX_OK;
}

static ngx_http_variable_t gl_variables[] = {
    { ngx_string("graylane_route"), NULL, gl_variable, offsetof(gl_ctx_t, route),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },
    { ngx_string("graylane_lane"), NULL, gl_variable, offsetof(gl_ctx_t, lane),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },
    { ngx_string("graylane_reason"), NULL, gl_variable, offsetof(gl_ctx_t, reason),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },
    ngx_http_null_variable
};

static ngx_int_t gl_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = gl_variables; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }
        var->get_handler = v->get_handler;
        var->data = v->data;
    }
    return NGX_OK;
}

/* The balancer. */

static ngx_int_t gl_get_peer(ngx_peer_connection_t *pc, void *data)
{
    gl_peer_data_t  *pd = data;
    gl_main_conf_t  *mcf;
    gl_peer_t        peer;
    size_t           len;

    if (pd->attempt == 0) {
        peer = pd->ctx->peer;
    } else {
        mcf = gl_main_conf_of((ngx_cycle_t *) ngx_cycle);
        ngx_memzero(&peer, sizeof(peer));
        if (mcf == NULL
            || mcf->lib.peer_at(pd->svc->h, pd->ctx->key.data, pd->ctx->key.len,
                                pd->ctx->peer.index + (uint32_t) pd->attempt, &peer) != 0)
        {
            peer.family = 0;
        }
    }

    pc->cached = 0;
    pc->connection = NULL;
    if (peer.family == 4) {
        ngx_memzero(&pd->sockaddr.sin, sizeof(struct sockaddr_in));
        pd->sockaddr.sin.sin_family = AF_INET;
        pd->sockaddr.sin.sin_port = htons(peer.port);
        ngx_memcpy(&pd->sockaddr.sin.sin_addr, peer.addr, 4);
        pc->socklen = sizeof(struct sockaddr_in);
#if (NGX_HAVE_INET6)
    } else if (peer.family == 6) {
        ngx_memzero(&pd->sockaddr.sin6, sizeof(struct sockaddr_in6));
        pd->sockaddr.sin6.sin6_family = AF_INET6;
        pd->sockaddr.sin6.sin6_port = htons(peer.port);
        ngx_memcpy(&pd->sockaddr.sin6.sin6_addr, peer.addr, 16);
        pc->socklen = sizeof(struct sockaddr_in6);
#endif
    } else {
        ngx_log_error(NGX_LOG_ERR, pc->log, 0, "graylane: service %V: cluster %V has no endpoint",
                      &pd->svc->name, &pd->ctx->key);
        return NGX_BUSY;
    }
    pc->sockaddr = &pd->sockaddr.sa;
    len = ngx_min(peer.name_len, GL_PEER_NAME);
    ngx_memcpy(pd->name_buf, peer.name, len);
    pd->name.data = pd->name_buf;
    pd->name.len = len;
    pc->name = &pd->name;
    return NGX_OK;
}

static void gl_free_peer(ngx_peer_connection_t *pc, void *data, ngx_uint_t state)
{
    gl_peer_data_t  *pd = data;

    pd->attempt++;
    if (pc->tries > 0) {
        pc->tries--;
    }
}

static ngx_int_t gl_init_peer(ngx_http_request_t *r, ngx_http_upstream_srv_conf_t *us)
{
    gl_srv_conf_t   *scf = ngx_http_conf_upstream_srv_conf(us, ngx_http_graylane_module);
    gl_main_conf_t  *mcf = ngx_http_get_module_main_conf(r, ngx_http_graylane_module);
    gl_peer_data_t  *pd;
    gl_ctx_t        *ctx;
    ngx_uint_t       more;

    ctx = gl_decide(r, scf->service);
    if (ctx == NULL) {
        return NGX_ERROR;
    }
    if (ctx->service != scf->service) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "graylane: upstream of service %V, but the request was decided for "
                      "another service", &((gl_service_t *) mcf->services.elts)[scf->service].name);
        return NGX_ERROR;
    }
    if (ctx->key.len == 0) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "graylane: balancer without a routing decision");
        return NGX_ERROR;
    }
    pd = ngx_pcalloc(r->pool, sizeof(gl_peer_data_t));
    if (pd == NULL) {
        return NGX_ERROR;
    }
    pd->ctx = ctx;
    pd->svc = (gl_service_t *) mcf->services.elts + scf->service;
    r->upstream->peer.data = pd;
    r->upstream->peer.get = gl_get_peer;
    r->upstream->peer.free = gl_free_peer;
    more = ctx->peer.count > 1 ? ngx_min(ctx->peer.count - 1, GL_MORE_TRIES) : 0;
    r->upstream->peer.tries = 1 + more;
    return NGX_OK;
}

static ngx_int_t gl_init_upstream(ngx_conf_t *cf, ngx_http_upstream_srv_conf_t *us)
{
    us->peer.init = gl_init_peer;
    return NGX_OK;
}

static char *gl_balancer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    gl_srv_conf_t                 *scf = conf;
    ngx_http_upstream_srv_conf_t  *uscf;

    if (scf->service != NGX_CONF_UNSET) {
        return "is duplicate";
    }
    scf->service = gl_service_arg(cf);
    if (scf->service == NGX_ERROR) {
        return NGX_CONF_ERROR;
    }
    uscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_upstream_module);
    if (uscf->peer.init_upstream) {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0, "load balancing method redefined");
    }
    uscf->peer.init_upstream = gl_init_upstream;
    uscf->flags = NGX_HTTP_UPSTREAM_CREATE | NGX_HTTP_UPSTREAM_MAX_FAILS
                  | NGX_HTTP_UPSTREAM_FAIL_TIMEOUT | NGX_HTTP_UPSTREAM_DOWN;
    return NGX_CONF_OK;
}

/* The status page: {"<service>": <the library's status>, ...} from the worker that answers. */
static ngx_int_t gl_status_handler(ngx_http_request_t *r)
{
    gl_main_conf_t  *mcf = ngx_http_get_module_main_conf(r, ngx_http_graylane_module);
    gl_service_t    *s = mcf->services.elts;
    ngx_chain_t      out;
    ngx_buf_t       *b;
    ngx_uint_t       i;
    ngx_int_t        rc;
    size_t           cap = 2, len;
    u_char          *buf, *p;

    if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }
    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }
    for (i = 0; i < mcf->services.nelts; i++) {
        cap += s[i].name.len + 4 + (s[i].h ? mcf->lib.status(s[i].h, NULL, 0) : 4) + 64;
    }
    buf = ngx_pnalloc(r->pool, cap);
    if (buf == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    p = buf;
    *p++ = '{';
    for (i = 0; i < mcf->services.nelts; i++) {
        if (i > 0) {
            *p++ = ',';
        }
        p = ngx_sprintf(p, "\"%V\":", &s[i].name);
        if (s[i].h == NULL) {
            p = ngx_cpymem(p, "null", 4);
            continue;
        }
        len = mcf->lib.status(s[i].h, p, cap - (p - buf) - 1);
        if (len == 0 || len > cap - (size_t) (p - buf) - 1) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;  /* it grew meanwhile: ask again */
        }
        p += len;
    }
    *p++ = '}';

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = p - buf;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }
    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    b->pos = buf;
    b->last = p;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;
    out.buf = b;
    out.next = NULL;
    return ngx_http_output_filter(r, &out);
}

static char *gl_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    clcf->handler = gl_status_handler;
    return NGX_CONF_OK;
}
