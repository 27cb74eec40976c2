-- See 0011_link_time_postgres_function.sql. One statement, run whole.
CREATE TRIGGER decision_policies_take_decision_time BEFORE INSERT ON decision_policies
FOR EACH ROW EXECUTE FUNCTION decision_policies_take_decision_time()
