DROP TABLE stock_movements;
DROP FUNCTION apply_stock_movement();
